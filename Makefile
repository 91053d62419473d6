# Everything runs from the project's own virtualenv in .venv, created on first use,
# so a fresh machine needs only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Inside the venv, so that a recreated venv is always reinstalled.
INSTALLED := $(VENV)/.compensa-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv demo test proto typecheck bench

help:
	@echo "make demo       run the checkout saga demo"
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

demo: $(INSTALLED)
	$(BIN)/compensa demo

# The Node.js participant of tests/test_contracts.py needs @grpc/grpc-js and
# @grpc/proto-loader, installed here once (the test installs them too when run
# alone). Without npm the test is skipped, loudly; under CI=true it fails.
NODE_TEST_MODULES := $(VENV)/node-test-modules
NODE_TEST_PACKAGES := @grpc/grpc-js@1 @grpc/proto-loader@0.8

$(NODE_TEST_MODULES)/.installed: | $(BIN)/python
	@if command -v npm >/dev/null && command -v node >/dev/null; then \
		npm install --prefix $(NODE_TEST_MODULES) --no-audit --no-fund $(NODE_TEST_PACKAGES) && touch $@; \
	elif [ "$${CI:-}" = "true" ]; then \
		echo "error: Node.js and npm are required under CI=true (the Node.js participant test)" >&2; exit 1; \
	else \
		echo "WARNING: Node.js/npm not installed: the Node.js participant test will be SKIPPED" \
			"(apt-get install nodejs npm)" >&2; \
	fi

# Lint and types first: they take seconds, and a failure of either fails the
# target (and so CI, which runs it) before the suite's minutes.
test: $(INSTALLED) $(NODE_TEST_MODULES)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
