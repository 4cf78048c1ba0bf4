# Two commands for a new user (see README):  make quickstart   |   make test
# Each sets up what it needs in .venv first; re-running is quick when nothing changed.
# --no-compile: Python byte-compiles only the modules it imports, on first use, not all of torch and TF.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile
CORE_STAMP := $(VENV)/.core-installed
ALL_STAMP := $(VENV)/.all-installed

.PHONY: setup setup-all quickstart test test-fast bench lint clean-runs

$(PY):
	$(PYTHON) -m venv $(VENV)

$(CORE_STAMP): pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

# torch and torchvision first, pinned to the builds this machine ships on disk.
$(ALL_STAMP): pyproject.toml $(CORE_STAMP)
	$(PIP) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) -e ".[torch,slurm,dev,tfds,photos]"
	$(PIP) --no-deps "facenet-pytorch==2.6.0"  # its pins (torch<2.3, numpy<2) are stale; it runs on ours
	touch $@

setup: $(CORE_STAMP)
setup-all: $(ALL_STAMP)

quickstart: setup-all
	$(PY) -m launch.pipeline --runs=runs/pipeline

test: setup-all
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15 tests

test-fast: setup-all
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" tests

bench: setup-all
	$(PY) benchmarks/bench_synth.py
	$(PY) benchmarks/bench_unet.py --size cpu-small
	$(PY) benchmarks/suite.py --profile cpu --threads 1

lint: setup-all
	$(VENV)/bin/ruff check .

clean-runs:
	rm -rf runs
