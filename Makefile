# aiso — developer entry points. `make dev` runs the platform, `make test` runs the tests.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: dev setup servers test unit e2e lint crds clean

## Set everything up (virtualenv, packages, RabbitMQ) and run the platform locally.
dev: setup
	bash hack/servers.sh install dev
	$(BIN)/aiso dev

## Virtualenv with aiso and its development extras, reinstalled when pyproject.toml changes.
## EXTRAS=dev,operator,bench,embed also installs the embeddings service's PyTorch.
EXTRAS ?= dev,operator,bench
setup: $(VENV)/.installed

# Strict editable mode links every module into build/, so the package-dir mapping
# (aiso.orchestrator → orchestrator/, …) works for mypy and for the namespace folder
# operator/ too. Links are per file: a new module needs a reinstall, hence the source list.
SOURCES := $(shell find aiso orchestrator wrapper operator services -name '*.py' -o -name '*.ini' 2>/dev/null)
$(VENV)/.installed: pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	rm -rf build/__editable__*
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]' --config-settings editable_mode=strict
	touch $@

## Install (when missing) and start RabbitMQ and PostgreSQL on loopback.
servers:
	bash hack/servers.sh start

## Lint, type-check, then every test: unit, integration (real RabbitMQ/PostgreSQL) and e2e
## (real kube-apiserver, built on first use).
test: setup servers lint
	bash hack/control-plane.sh build
	$(BIN)/pytest

unit: setup servers
	$(BIN)/pytest --ignore=tests/e2e

e2e: setup servers
	bash hack/control-plane.sh build
	$(BIN)/pytest tests/e2e

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/aiso crds --check
	# From outside the repository: here the source folder aiso/ would shadow the installed
	# package and hide aiso.orchestrator, aiso.wrapper, … from the check.
	cd build && ../$(BIN)/mypy --config-file ../pyproject.toml -p aiso

clean:
	rm -rf build $(VENV)/.installed .aiso .mypy_cache .ruff_cache .pytest_cache
