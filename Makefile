# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv, install torch==2.13.0 first (an unpinned torch would pull CUDA builds),
# then this project in editable mode with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip install -q --disable-pip-version-check
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-slow test-all clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[dev,notebooks]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)
