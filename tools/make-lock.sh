#!/usr/bin/env bash
# Regenerates requirements.lock: every package version resolved for
# `pip install .[book,test]` in a clean venv, pinned with ==.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(tools/find-python.sh)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYBIN" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check ".[book,test]"
{
  echo "# Exact versions behind the published results ($("$PYBIN" --version), $(uname -m))."
  echo "# Regenerate with \`make lock\`; \`make setup\` installs from this file."
  "$tmp/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i '^dataweights' | sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
