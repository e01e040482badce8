# One entry point for newcomers: `make install`, `make test`, `make demo`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# facenet-pytorch's metadata pins torch<2.3/numpy<2; it works with our pins, so it goes in without deps.
FACENET := facenet-pytorch==2.6.0

.PHONY: install test test-all test-quick demo ui lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(FACENET)
	$(BIN)/mfr doctor --no-services

# Two pytest workers (pytest-xdist), one test file each at a time: most tests wait on Ray, MLflow or a
# subprocess, so two share the 2-core build machine well. PYTEST_ARGS="-n 0" runs them in one process.
# `test` (CI) leaves out the registry sweeps (the default plug-ins' tests stay in); `test-all` runs them too.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 -m "not sweep" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

test-quick: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not sweep" $(PYTEST_ARGS)

demo: install
	$(BIN)/python jobs/quickstart.py configs/quickstart.yaml

ui:
	$(BIN)/mfr ui

lint:
	$(BIN)/ruff check mfr_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
