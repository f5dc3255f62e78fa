#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a message.
# Plain `python3` is 3.11 on some machines and pyenv shims can exist without
# being runnable, so every candidate is actually executed.
set -u
for cand in "${PYTHON:-}" python3.14 python3.13 python3.12 \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 python3 python; do
  [ -n "$cand" ] || continue
  p=$(command -v "$cand" 2>/dev/null) || continue
  if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' \
      >/dev/null 2>&1; then
    "$p" -c 'import sys; print(sys.executable)'
    exit 0
  fi
done
echo "error: dataweights needs Python >= 3.12; none found (set PYTHON=/path/to/python3.12)" >&2
exit 1
