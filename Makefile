# `make run`: set up .venv and run the pipeline flow once on the built-in simulated data.
# `make test`: set up .venv and run ruff and the test suite (what CI runs via .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= conf/default.yaml

# Offline and quiet: no telemetry from MLflow, Prefect or Great Expectations.
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test bench lint format clean schedule ui

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) with $(PYTHON) (about a minute on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true; }
	touch $(STAMP)

setup: $(STAMP)

# The Prefect flow: validate -> prepare -> tune -> train -> evaluate -> register -> promote.
run: setup
	$(BIN)/python -m flows.pipeline --config $(CONFIG)

# The daily deployment, served with a local Prefect server (UI on http://127.0.0.1:4200).
schedule: setup
	$(BIN)/python -m flows.deploy --config $(CONFIG) --start-server

# The MLflow UI on the local store that `make run` writes (http://127.0.0.1:5000).
ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow/mlflow.db --host 127.0.0.1 --port 5000

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# Speed goals live here, not in tests: regenerates benchmarks/RESULTS.md (about 5 minutes).
bench: setup
	flock /tmp/esmm-cpu.lock $(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
