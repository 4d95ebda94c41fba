# The two commands a newcomer runs: `make run` and `make test`. Both start with `make setup`,
# which creates .venv and installs only when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.setup-done
TORCH_VERSION := 2.13.0
COLOSSALAI_VERSION := 0.5.0
# What colossalai imports; it is installed with --no-deps because its pins pull torch<=2.5.1.
COLOSSALAI_RUNTIME := galore-torch bitsandbytes kernels

export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test lint bench ui ui-prefect ui-mlflow screenshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the CPU build on this disk: a plain `torch` requirement pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	$(BIN)/python -m pip install -q $(COLOSSALAI_RUNTIME)
	$(BIN)/python -m pip install -q --no-deps colossalai==$(COLOSSALAI_VERSION)
	@test -d .dvc || $(BIN)/dvc init -q
	touch $(STAMP)

run: setup
	$(BIN)/python -m flows.pipeline

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/meta_probe.py

ui-prefect: setup
	$(BIN)/prefect server start --host 127.0.0.1

ui-mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

ui: ui-mlflow

# Prefect UI screenshots (deployment + a completed run) in reports/; needs `apt-get install chromium`.
screenshot: setup
	$(BIN)/python -m flows.screenshot --out-dir reports

clean:
	rm -rf data/raw data/meta data/shards reports metrics models/vae models/diffusion .dvc/cache .dvc/tmp
