# The two set-up commands: `make demo` (run the gateway and show it working) and
# `make test` (the whole test suite). Both install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint prometheus

$(BIN)/smallfirst: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/smallfirst
	$(BIN)/smallfirst demo

test: $(BIN)/smallfirst prometheus
	$(BIN)/smallfirst small-model setup
	$(BIN)/python -m pytest

# Debian's Prometheus, for the dashboard-query test; without apt (or root) that test skips.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
	  >/dev/null; } || echo "prometheus not installed: the dashboard query test will skip"

lint: $(BIN)/smallfirst
	$(BIN)/ruff check .
