# Everything runs from the project's own virtualenv in .venv, created on first use,
# so a fresh machine needs only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Inside the venv, so that a recreated venv is always reinstalled.
INSTALLED := $(VENV)/.compensa-installed
PYTEST_ARGS ?=
# The suite runs on two pytest-xdist workers: its time is mostly waiting (leases,
# participants' work, backoffs, processes starting), which two workers overlap on
# two cores. Not `-n auto`: more workers than two would only share the same two
# cores and PostgreSQL's 100 connections. --dist loadgroup keeps the tests marked
# xdist_group("heavy") on one worker, one after another (see tests/conftest.py).
# PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv demo test proto typecheck bench browser node

help:
	@echo "make demo       run the checkout saga demo (STAY=1: keep its dashboard up until Ctrl-C)"
	@echo "make test       lint (ruff), type-check (mypy), then the whole test suite (PYTEST_ARGS=... passes through)"
	@echo "make proto      regenerate generated/ from protos/"
	@echo "make typecheck  mypy --strict over orchestrator/compensa and participants/compensa"
	@echo "make bench      run the benchmarks, with the peers (PEERS=0 without; BENCH_ARGS=... passes options)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

venv: $(INSTALLED)

# STAY=1 keeps the demo's orchestrator and dashboard up afterwards, until Ctrl-C.
STAY ?=
demo: $(INSTALLED)
	$(BIN)/compensa demo $(if $(filter 1,$(STAY)),--stay)

# The dashboard's browser test drives headless Chromium through chromedriver;
# under CI=true it fails rather than skips without them. Installed here when
# missing and apt-get can run (as root); otherwise one line says what to
# install, and under CI=true the target stops there (elsewhere that one test
# is skipped, loudly). APT_GET names the installer (tests point it elsewhere).
APT_GET ?= apt-get
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v $(APT_GET) >/dev/null; then \
		echo "installing $(BROWSER_PACKAGES) for the dashboard's browser test" >&2; \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) update -q && \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q --no-install-recommends $(BROWSER_PACKAGES); \
	elif [ "$$CI" = true ] || [ "$$CI" = 1 ] || [ "$$CI" = yes ]; then \
		echo "make test needs chromium and chromedriver (Debian/Ubuntu, as root: apt-get install $(BROWSER_PACKAGES))" >&2; \
		exit 2; \
	else \
		echo "chromium or chromedriver is missing: the dashboard's browser test will be skipped (apt-get install $(BROWSER_PACKAGES))" >&2; \
	fi

# The Node.js participant of tests/test_contracts.py needs node and npm, and
# @grpc/grpc-js and @grpc/proto-loader, installed once into the venv (the test
# installs them too when run alone). Node.js comes from apt-get when missing
# and apt-get can run (as root); otherwise, as for the browser, one line says
# what to install: under CI=true the target stops there, elsewhere that one
# test is skipped, loudly.
NODE_TEST_MODULES := $(VENV)/node-test-modules
NODE_TEST_PACKAGES := @grpc/grpc-js@1 @grpc/proto-loader@0.8
NODE_PACKAGES := nodejs npm
node:
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v $(APT_GET) >/dev/null; then \
			echo "installing $(NODE_PACKAGES) for the Node.js participant test" >&2; \
			DEBIAN_FRONTEND=noninteractive $(APT_GET) update -q && \
			DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q --no-install-recommends $(NODE_PACKAGES); \
		fi; \
	fi; \
	if command -v node >/dev/null && command -v npm >/dev/null; then \
		[ -f $(NODE_TEST_MODULES)/.installed ] || { \
			npm install --prefix $(NODE_TEST_MODULES) --no-audit --no-fund $(NODE_TEST_PACKAGES) >&2 && \
			touch $(NODE_TEST_MODULES)/.installed; }; \
	elif [ "$$CI" = true ] || [ "$$CI" = 1 ] || [ "$$CI" = yes ]; then \
		echo "make test needs node and npm (Debian/Ubuntu, as root: apt-get install $(NODE_PACKAGES))" >&2; \
		exit 2; \
	else \
		echo "node or npm is missing: the Node.js participant test will be skipped (apt-get install $(NODE_PACKAGES))" >&2; \
	fi

# Lint and types first: they take seconds, and a failure of either fails the
# target (and so CI, which runs it) before the suite's minutes.
test: $(INSTALLED) browser node
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# protoc-gen-mypy, protoc-gen-mypy_grpc and protoc-gen-compensa_python are
# scripts in the venv, hence PATH.
# Old outputs go first so that a deleted proto leaves nothing behind; the
# __init__.py files under generated/ are ours, not protoc's, and stay.
proto: $(INSTALLED)
	find generated \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' -o -name '*_pb2_grpc.pyi' \
		-o -name '*_compensa.py' \) -delete
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc --proto_path=protos \
		--python_out=generated --grpc_python_out=generated \
		--mypy_out=generated --mypy_grpc_out=generated \
		$$(find protos -name '*.proto' | LC_ALL=C sort)
	# Second: the contracts' stubs, whose plugin imports the _pb2 modules just made.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc --proto_path=protos \
		--compensa_python_out=generated $$(find protos -name '*.proto' | LC_ALL=C sort)

typecheck: $(INSTALLED)
	$(BIN)/mypy

# PEERS=0 leaves the peers (DBOS, Temporal) out, and their packages uninstalled;
# BENCH_ARGS=... passes options to bench/run.py (see bench/README.md).
PEERS ?= 1
BENCH_ARGS ?=
BENCH_PEERS_INSTALLED := $(VENV)/.compensa-bench-peers-installed

$(BENCH_PEERS_INSTALLED): pyproject.toml | $(INSTALLED)
	$(BIN)/python -m pip install -e ".[dev,bench]"
	touch $@

bench: $(INSTALLED) $(if $(filter 1,$(PEERS)),$(BENCH_PEERS_INSTALLED))
	$(BIN)/python bench/run.py $(if $(filter 1,$(PEERS)),--peers) $(BENCH_ARGS)
