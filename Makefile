# Two set-up commands on a fresh machine (Python >= 3.10 and PyPI access):
#   make demo   - create .venv if absent, install mil, run `mil demo` on the built-in cohort
#   make test   - create .venv if absent, install mil with test and slide extras, run ruff (lint and format check) and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first: a pinned CPU build where one is at hand, else any torch>=2.2 from PyPI
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)" || $(BIN)/pip install --quiet "torch>=2.2"
	$(BIN)/pip install --quiet -e ".[test,slides]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/mil demo

lint: $(VENV)/.installed
	$(BIN)/ruff check mil tests benchmarks
	$(BIN)/ruff format --check mil tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=30

clean:
	rm -rf $(VENV) results .pytest_cache
