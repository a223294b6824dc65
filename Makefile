# Every target bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[dev]').
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SF := $(VENV)/bin/singleframe
STAMP := $(VENV)/.installed
DEMO_STORE ?= demo_store
PYTEST_ARGS ?=

.PHONY: venv demo test bench bench-quick serve clean lint

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## make demo: simulate a small survey (2 visits x 4 detectors), calibrate it with the Prefect flow, print the evaluation.
demo: $(STAMP)
	rm -rf $(DEMO_STORE)
	$(SF) simulate --store $(DEMO_STORE) --preset demo
	$(SF) run --store $(DEMO_STORE)
	$(SF) evaluate --store $(DEMO_STORE)

## make test: the whole test suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make bench: time each stage on a simulated 4096x4096 detector (median of repeated runs, peak memory).
bench: $(STAMP)
	$(PY) -m singleframe.benchmarks --size 4096 --repeat 5

bench-quick: $(STAMP)
	$(PY) -m singleframe.benchmarks --size 2048 --repeat 3

lint: $(STAMP)
	$(VENV)/bin/ruff check core steps io flows sim tests

clean:
	rm -rf $(DEMO_STORE) build dist *.egg-info .pytest_cache
