#!/usr/bin/env bash
# Run on a networked machine: downloads wheels for what `jaxpage serve` needs beyond the GPU
# image (flask, gunicorn, prometheus-client and all their dependencies, plus pip itself as a
# fallback installer) into device_wheels/ at the repository root. Carry that folder to the GPU
# machine (it is git-ignored) and run scripts/install_device_wheels.sh there.
#
#   bash scripts/fetch_device_wheels.sh
#
# Overrides (environment): DEVICE_PYTHON_VERSION (default 3.12, the GPU image's Python),
# DEVICE_WHEELS (default <repo>/device_wheels), PYTHON (the interpreter whose pip downloads;
# default: the repo's .venv if present, else python3), DEVICE_REQUIREMENTS (default: the
# versions the CPU test suite runs with).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${DEVICE_WHEELS:-$repo/device_wheels}"
pyver="${DEVICE_PYTHON_VERSION:-3.12}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
# shellcheck disable=SC2206  # word splitting intended: a list of requirement specifiers
reqs=(${DEVICE_REQUIREMENTS:-flask==3.1.3 gunicorn==27.0.1 prometheus-client==0.26.0 pip})

abi="cp${pyver/./}"
mkdir -p "$dest"
# Binary wheels only, for CPython $pyver on x86_64 glibc Linux; pip resolves the whole
# dependency tree for that target (not for this machine's Python).
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$dest" \
  --only-binary=:all: --implementation cp --python-version "$pyver" --abi "$abi" --abi abi3 \
  --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any "${reqs[@]}"

echo "wheels for CPython $pyver in $dest ($(du -sh "$dest" | cut -f1)):"
ls -1 "$dest"
