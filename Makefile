# `make` (or `make help`) lists the targets. Everything runs inside .venv, built by `make setup`.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test test-unit test-integration lint format demo bench default-model clean distclean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 goes in first: it is the CPU build, and pinning it keeps pip from pulling a CUDA one.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

setup: $(STAMP) ## Create .venv and install the package with its dev tools (instant when up to date)

test: lint ## Lint, then run the whole suite: unit tests, doctests, integration tests (starts a broker)
	$(PY) -m pytest

test-unit: setup ## Run the unit tests and doctests only (no broker)
	$(PY) -m pytest -m 'not integration and not slow'

test-integration: setup ## Run the integration tests against the embedded tansu broker
	$(PY) -m pytest -m integration

lint: setup ## ruff check, ruff format --check and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy detector

format: setup ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: setup ## Run everything on this machine: embedded broker, producer, worker, metrics
	$(VENV)/bin/detector demo

bench: setup ## Measure the engine's throughput (bench/engine.py)
	$(PY) bench/engine.py

default-model: setup ## Retrain the shipped model detector/default_model on synthetic data
	$(VENV)/bin/detector train --synthetic --output detector/default_model --seed 0

clean: ## Remove caches and build outputs (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean ## Also remove .venv
	rm -rf $(VENV)
