# Two commands set up a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Offline, no telemetry, everywhere.
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test install bench clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

# `crossalign check` first: DVC removes a stage's outputs before it notices a param missing from
# params.yaml, so a typo must be caught before `dvc repro` starts. Then where to look, and how long it took.
run: $(STAMP)
	@start=$$(date +%s); set -e; \
	echo "$(BIN)/crossalign check"; $(BIN)/crossalign check; \
	echo "$(BIN)/dvc repro"; $(BIN)/dvc repro; \
	$(BIN)/crossalign summary --elapsed $$(( $$(date +%s) - start ))

# lint-imports: the layering contracts in pyproject.toml ([tool.importlinter]).
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.preprocess
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.evaluate
