#!/usr/bin/env bash
# The whole test suite (what `make test` and CI run). Assumes `make setup data`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu MPLBACKEND=Agg PYTHONHASHSEED=0
t0=$SECONDS
step() { printf '\n=== %s (elapsed %ss) ===\n' "$1" $((SECONDS - t0)); }

step "unit tests and drift guard (numbers + pixels)"
$PY -m pytest tests -q -p no:cacheprovider --durations=15

step "sharding tests on 8 fake CPU devices (own process)"
DATAWEIGHTS_SHARDING_RUN=1 $PY -m pytest tests/sharding -q -p no:cacheprovider

step "nbval: re-execute every chapter, compare tagged cells"
$PY -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-sanitize-with tests/nbval_sanitize.cfg book/*.ipynb

step "strict book build (warnings are errors)"
$PY -m dataweights build

step "done"
