#!/usr/bin/env bash
# MaxText 0.2.5 in its own venv (.venv-maxtext), for bench_lm_train.py's
# peer comparison. Everything is installed with --no-deps at the pinned
# versions of maxtext-requirements.txt, which use the project's jax, jaxlib,
# flax, optax and numpy (requirements.lock) -- MaxText's own pins (CUDA,
# TPU, cloud clients) are not wanted on a CPU box.
#   bash benchmarks/peers/setup_maxtext.sh
#   python benchmarks/bench_lm_train.py --maxtext-python .venv-maxtext/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
PYBIN=$(tools/find-python.sh)
[ -x .venv-maxtext/bin/python ] || "$PYBIN" -m venv .venv-maxtext
.venv-maxtext/bin/python -m pip install -q --disable-pip-version-check \
  --no-deps -r benchmarks/peers/maxtext-requirements.txt
.venv-maxtext/bin/python -c "from maxtext.trainers.pre_train import train" \
  && echo "MaxText ready: .venv-maxtext/bin/python"
