# Every target bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[dev]').
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SF := $(VENV)/bin/singleframe
STAMP := $(VENV)/.installed
DEMO_STORE ?= demo_store
PYTEST_ARGS ?=

.PHONY: venv demo test bench bench-quick bench-psf bench-stars bench-setup serve clean lint

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
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(SF) run --store $(DEMO_STORE)
	$(SF) evaluate --store $(DEMO_STORE)

## make test: the whole test suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make bench: ours vs SExtractor+PSFEx+SCAMP, astrometry.net and astroscrappy on simulated 4096x4096 frames and one 2048x2048.
bench: $(STAMP)
	$(PY) -m singleframe.benchmarks --suite full --repeat 5 --peer-repeat 3

## make bench-quick: CI-sized 2048x2048 frames, fewer repeats; fails if a quality bar regresses.
bench-quick: $(STAMP)
	$(PY) -m singleframe.benchmarks --suite quick --repeat 3 --peer-repeat 1 --check

## make bench-orchestration: issue-6 bars (Prefect overhead, Dask speed-up, re-run, flow memory) on a simulated
## 20 x 4096² visit against a local Prefect server; writes benchmarks/results/orchestration-*.{md,json}.
.PHONY: bench-orchestration
bench-orchestration: $(STAMP)
	$(PY) -m singleframe.orchestration_bench --detectors 20 --size 4096

## make bench-psf: our PSF model vs PSFEx, and Piff on our stamps, over 8 independent simulated 4096² typical frames
## (rms of the median residuals; a single frame's comparison is at the noise floor; 5-12 min, Piff ~30 s a frame);
## writes benchmarks/results/psf-*.{md,json}.
bench-psf: $(STAMP)
	$(PY) -m singleframe.psf_bench --frame 4096-typical --seeds 8 --piff

## make bench-stars: star/galaxy separation on the 4096² poor-seeing frame: the configured cut, uniform size
## cuts and the best per-S/N cut chosen with the truth (a bound); writes benchmarks/results/stars-*.{md,json}.
bench-stars: $(STAMP)
	$(PY) -m singleframe.selection_bench --frame 4096-poor-seeing

## make bench-setup: install the peer systems (Debian packages when root with apt; astroscrappy into .venv).
bench-setup: $(STAMP)
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y source-extractor psfex scamp astrometry.net; \
	else \
		echo "bench-setup: skipping apt packages (needs root and apt-get); install source-extractor psfex scamp astrometry.net yourself"; \
	fi
	$(PY) -m pip install --quiet -e '.[bench]'

## make serve: local Prefect server on 127.0.0.1:4200, the deployments of deployments/prefect.yaml and a worker.
serve: $(STAMP)
	$(SF) serve

lint: $(STAMP)
	$(VENV)/bin/ruff check core steps io flows sim tests

clean:
	rm -rf $(DEMO_STORE) build dist *.egg-info .pytest_cache
