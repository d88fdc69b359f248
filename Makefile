# One command to serve the example, one to pass the tests; each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit clean bench bench-baseline docs compat compat-docs dist k8s-image-context

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on disk here; an unpinned torch pulls a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,rag]'
	# Byte-compile shoal now (a wheel install does): with PYTHONDONTWRITEBYTECODE set, every
	# process would compile each module from source at every start.
	$(PY) -m compileall -q shoal
	touch $(STAMP)

install: $(STAMP)

## Serve the seed's RAG pipeline on http://127.0.0.1:$(PORT) (Ctrl-C stops everything; `make run PORT=8001`
## for another port). It prints how to reach it with `shoal` from another terminal (.venv/bin/shoal).
PORT ?= 8000
run: $(STAMP)
	$(PY) -m compileall -q shoal examples >/dev/null
	HF_HUB_OFFLINE=1 $(VENV)/bin/shoal run --port $(PORT) examples.rag.app:app

## Lint, type-check and run the whole test suite.
test: $(STAMP)
	$(PY) -m ruff check shoal tests examples benchmarks
	$(PY) -m mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	$(PY) -m mkdocs build --strict -q

## Ray Serve's own documentation examples, imports switched to shoal (../shared/ray_doc_code; a
## few minutes; report in build/ray-doc-examples/RESULTS.md). Not part of `make test`.
RAY_DOC_CODE ?= ../shared/ray_doc_code
compat: $(STAMP)
	$(PY) $(RAY_DOC_CODE)/run.py --setup-extras
	$(PY) $(RAY_DOC_CODE)/run.py

## Regenerate docs/compatibility.md from shoal/_compat.py (the Ray Serve compatibility table).
compat-docs: $(STAMP)
	$(PY) scripts/gen_compat_docs.py

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(PY) -m ruff check shoal tests examples benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

## shoal's release artifacts, its wheel and sdist, in dist/ (shoal is not on PyPI: install the wheel,
## `pip install 'dist/shoal-0.1.0-py3-none-any.whl[kubernetes]'`). The venv's setuptools builds it, no download.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

## The RAG example's image context in build/image: Dockerfile, shoal's wheel, the example's code
## (`docker build -t REGISTRY/rag:TAG build/image`). IMAGE_ARGS adds flags, e.g. IMAGE_ARGS="--torch-index cuda".
IMAGE_CONTEXT ?= build/image
IMAGE_ARGS ?=
k8s-image-context: $(STAMP)
	$(VENV)/bin/shoal k8s dockerfile examples.rag.app:app --out $(IMAGE_CONTEXT) --extra rag $(IMAGE_ARGS)

## Build the documentation site into site/ (mkdocs serve previews it on :8000).
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

## Side-by-side benchmarks against Ray Serve and bare uvicorn (Ray goes into .venv-bench only; about 10 min).
## Pass options with BENCH_ARGS, e.g. `make bench BENCH_ARGS="--quick --only echo,handle"`.
bench: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(BENCH_PY) benchmarks/run.py $(BENCH_ARGS)

## The same suite for the working tree's shoal next to shoal at BASELINE (a git ref; default: the commit
## before the architecture refactor), workload by workload, with new/old ratios in RESULTS.md.
## E.g. `make bench-baseline BASELINE=HEAD~1 BENCH_ARGS="--quick --only echo,handle"`.
## Writes benchmarks/vs-baseline/ (RESULTS.md, results.json), leaving the Ray comparison in benchmarks/ alone.
BASELINE ?= 1d00e29
bench-baseline: $(BENCH_STAMP)
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(BENCH_PY) benchmarks/run.py --baseline $(BASELINE) --framework shoal --out-dir benchmarks/vs-baseline $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache dist $(IMAGE_CONTEXT)
