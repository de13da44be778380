# The two set-up commands: `make demo` (run the gateway and show it working) and
# `make test` (the whole test suite). Both install what they need on first use, from the
# hashed lock file requirements.lock; `make lock` re-resolves it within pyproject.toml's bounds.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
SERVE_LOCK := requirements-serve.lock
UV ?= uv==0.13.9

.PHONY: demo test lint prometheus haproxy lock

# The lock pins every dependency (runtime and the dev extra) with its hashes; the project
# itself goes in editable, without dependencies of its own.
$(BIN)/smallfirst: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

demo: $(BIN)/smallfirst
	$(BIN)/smallfirst demo

test: $(BIN)/smallfirst prometheus haproxy
	$(BIN)/smallfirst small-model setup
	$(BIN)/python -m pytest

# Debian's Prometheus, for the dashboard-query test; without apt (or root) that test skips.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
	  >/dev/null; } || echo "prometheus not installed: the dashboard query test will skip"

# Debian's HAProxy, the load balancer in front of the multi-replica test; without apt it skips.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy || { command -v apt-get \
	  >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq --no-install-recommends \
	  haproxy >/dev/null; } || echo "haproxy not installed: the multi-replica test will skip"

lint: $(BIN)/smallfirst
	$(BIN)/ruff check .

# Re-resolve the newest releases within pyproject.toml's bounds (runtime + dev extra, Python
# 3.11+, every platform; uv is needed only here), write the lock, then run the suite on it.
# $(SERVE_LOCK) is the runtime subset of the same pins, for the container image.
lock:
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(UV)'
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
	  --generate-hashes --upgrade --no-emit-package smallfirst \
	  --custom-compile-command 'make lock' --quiet -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	  --generate-hashes --no-emit-package smallfirst --constraint $(LOCK) \
	  --custom-compile-command 'make lock' --quiet -o $(SERVE_LOCK)
	$(MAKE) test
