#!/usr/bin/env bash
# Run on the GPU machine (no network) from anywhere in the checkout: installs flask, gunicorn
# and prometheus-client (what `jaxpage serve` needs beyond the GPU image) offline from the
# device_wheels/ folder that scripts/fetch_device_wheels.sh filled on a networked machine and
# that was carried along with the working tree (it is git-ignored).
#
#   bash scripts/install_device_wheels.sh && source scripts/device_env.sh && python3 -m ...
#
# Where: into the user site (~/.local, on sys.path by default) for a system Python, into the
# environment itself for a virtualenv. Requirements the image already satisfies are kept as
# they are (pip never reinstalls them); nothing is downloaded. Idempotent: a second run
# installs nothing and prints one line.
#
# Overrides (environment): PYTHON (default python3), DEVICE_WHEELS (default <repo>/device_wheels).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="${DEVICE_WHEELS:-$repo/device_wheels}"
py="${PYTHON:-python3}"
reqs=("flask>=3.0" "gunicorn>=22.0" "prometheus-client>=0.20")  # as in pyproject.toml
me="install_device_wheels"

if ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "$me: no wheels in $wheels." >&2
  echo "$me: run scripts/fetch_device_wheels.sh on a machine with network access, then carry" \
       "the folder to this machine (the device tool's carry: [\"device_wheels\"])." >&2
  exit 1
fi

# pip: the image's own, else the one carried as a wheel (a wheel of pip runs as pip).
if "$py" -m pip --version >/dev/null 2>&1; then
  pip=("$py" -m pip)
else
  pip_wheel="$(compgen -G "$wheels/pip-*.whl" | head -n 1 || true)"
  if [[ -z "$pip_wheel" ]]; then
    echo "$me: $py has no pip and $wheels holds no pip wheel" >&2
    exit 1
  fi
  pip=("$py" "$pip_wheel/pip")
fi

# A virtualenv takes the packages itself; a system Python puts them in the user site.
mode="$("$py" -c 'import site, sys
print("env" if sys.prefix != sys.base_prefix or not site.ENABLE_USER_SITE else "user")')"
where=()
[[ "$mode" == user ]] && where=(--user)
# PEP 668 marks distro Pythons as externally managed; packages added to the user site (or a
# throwaway machine's environment) only add to it, so say that we know.
if "$py" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi

PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1 "${pip[@]}" install --quiet --no-index \
  --find-links "$wheels" --disable-pip-version-check --no-warn-script-location \
  ${where[@]+"${where[@]}"} "${reqs[@]}"

if ! "$py" -c 'import flask, gunicorn, prometheus_client' 2>/dev/null; then
  echo "$me: installed ($mode), but $py cannot import flask, gunicorn and prometheus_client;" \
       "is the user site disabled (PYTHONNOUSERSITE, python -s)?" >&2
  "$py" -c 'import flask, gunicorn, prometheus_client' || true
  exit 1
fi
"$py" -c 'from importlib.metadata import version as v
print("serving packages ready: flask", v("flask"), "gunicorn", v("gunicorn"),
      "prometheus-client", v("prometheus-client"))'
