#!/usr/bin/env bash
# The whole test suite (what `make test` and CI run). Assumes `make setup data`.
#
# Each chapter is executed exactly once (nbval, book profile). That run writes
# its results to _build/ci-results/<chapter>/, and the drift guard compares
# them with the published ones; the browser tests then open the built book.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu MPLBACKEND=Agg PYTHONHASHSEED=0
FRESH=_build/ci-results
# Test processes in parallel (pytest-xdist): the unit tests are dominated by
# single-threaded XLA compilation, so two workers on two cores save about a
# third of the time (12.3 -> 8.6 minutes measured on a 2-core machine).
# DATAWEIGHTS_TEST_WORKERS=0 runs everything in one process.
WORKERS=${DATAWEIGHTS_TEST_WORKERS:-2}
t0=$SECONDS
step() { printf '\n=== %s (elapsed %ss) ===\n' "$1" $((SECONDS - t0)); }

step "unit tests"
$PY -m pytest tests -q -p no:cacheprovider -n "$WORKERS" --durations=15 \
  -m "not chapters and not browser"

step "sharding tests on 8 fake CPU devices (own process)"
DATAWEIGHTS_SHARDING_RUN=1 $PY -m pytest tests/sharding -q -p no:cacheprovider

step "nbval: execute every chapter once (book profile), compare tagged cells"
rm -rf "$FRESH"
mkdir -p "$FRESH"
# --dist loadfile: a notebook's cells stay in order on one worker (one kernel);
# chapters run side by side.
DATAWEIGHTS_RESULTS_DIR="$PWD/$FRESH" $PY -m pytest -q -p no:cacheprovider \
  -n "$WORKERS" --dist loadfile --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
  --nbval-sanitize-with tests/nbval_sanitize.cfg book/*.ipynb

step "drift guard: that run's results against the published ones"
DATAWEIGHTS_RESULTS_DIR="$PWD/$FRESH" $PY -m pytest tests/test_published.py -q \
  -p no:cacheprovider -m chapters

step "strict book build (warnings are errors, maths served offline)"
DATAWEIGHTS_REQUIRE_OFFLINE_MATHJAX=1 $PY -m dataweights build

step "the built book in headless Chromium (screenshots in _build/screenshots/)"
$PY -m pytest tests/test_browser.py -q -p no:cacheprovider -m browser

step "done"
