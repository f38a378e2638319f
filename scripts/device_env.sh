#!/usr/bin/env bash
# Source this on a GPU machine that has the image's JAX but not our package installed:
# makes `jaxpage`, `jaxpage.models` and `jaxpage.benchmarks` importable from the checkout.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
ln -sfn ../models jaxpage/models          # the installed layout: models/ is jaxpage.models
ln -sfn ../benchmarks jaxpage/benchmarks
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAXPAGE_CACHE="${JAXPAGE_CACHE:-/tmp/jaxpage-cache}"
