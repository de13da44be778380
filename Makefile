# The two set-up commands: `make demo` (run the gateway and show it working) and
# `make test` (the whole test suite). Both install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint

$(BIN)/smallfirst: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/smallfirst
	$(BIN)/smallfirst demo

test: $(BIN)/smallfirst
	$(BIN)/smallfirst small-model setup
	$(BIN)/python -m pytest

lint: $(BIN)/smallfirst
	$(BIN)/ruff check .
