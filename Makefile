# One command to serve the example, one to pass the tests; each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on disk here; an unpinned torch pulls a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,rag]'
	touch $(STAMP)

install: $(STAMP)

## Serve the seed's RAG pipeline on http://127.0.0.1:8000 (Ctrl-C stops everything).
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/shoal run examples.rag.app:app

## Lint, type-check and run the whole test suite.
test: $(STAMP)
	$(PY) -m ruff check shoal tests examples benchmarks
	$(PY) -m mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(PY) -m ruff check shoal tests examples benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
