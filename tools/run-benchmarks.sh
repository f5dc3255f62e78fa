#!/usr/bin/env bash
# Runs every benchmark; each writes bench-results/<name>.json.
# Usage: tools/run-benchmarks.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} MPLBACKEND=Agg
mkdir -p bench-results
for f in benchmarks/bench_*.py; do
  name=$(basename "$f" .py); name=${name#bench_}
  echo "=== $name ==="
  $PY "$f" --out "bench-results/$name.json" "$@"
done
