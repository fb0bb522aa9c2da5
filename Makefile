# hfx developer commands. `make demo` and `make test` work on a fresh machine: they install what is missing first.
PY ?= python3
VENV := .venv
FLOOR := .venv-floor
PACKAGES := -e ./hfx_kernels -e ./hfx_optim -e ./hfx_attention -e ./hfx_trainers
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRL_EXPERIMENTAL_SILENCE := 1
export TOKENIZERS_PARALLELISM := false
PIP_QUIET := -q --progress-bar off

.PHONY: install install-floor demo test test-slow test-floor bench lint

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml hfx_*/pyproject.toml requirements/latest.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) torch==2.13.0   # the CPU build, from this machine's disk
	$(VENV)/bin/pip install $(PIP_QUIET) -c requirements/latest.txt -e ".[dev]" $(PACKAGES)
	touch $@

install-floor: $(FLOOR)/.installed
$(FLOOR)/.installed: pyproject.toml hfx_*/pyproject.toml requirements/floor.txt
	test -x $(FLOOR)/bin/python || $(PY) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install $(PIP_QUIET) torch==2.13.0
	$(FLOOR)/bin/pip install $(PIP_QUIET) -c requirements/floor.txt -e ".[dev]" $(PACKAGES)
	touch $@

demo: install
	$(VENV)/bin/hfx demo

test: install
	$(VENV)/bin/python -m pytest -q

test-slow: install
	$(VENV)/bin/python -m pytest -q -m slow --timeout 1800

test-floor: install-floor
	$(FLOOR)/bin/python -m pytest -q -m "floor and not slow"

bench: install
	$(VENV)/bin/python benchmarks/import_time.py

lint: install
	$(VENV)/bin/ruff check .
