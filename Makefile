# Every target works from a fresh clone: `.venv` is created and the project installed on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
# CPU torch comes from a pinned wheel where no NVIDIA GPU is present: an unpinned torch pulls a
# multi-GB CUDA build. With a GPU, pip resolves the CUDA build through the project's dependencies.
TORCH_CPU ?= torch==2.13.0

export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

.PHONY: install demo sweep test lint demo-assets mlflow-ui ui serve serve-model bench bench-serving stack-test clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install "$(TORCH_CPU)"; fi
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo-assets: $(STAMP)
	$(BIN)/qlora demo-assets

# The whole flow on the offline demo: assets are built on first use, then validate -> check GPU ->
# train -> evaluate -> register into the local MLflow store (mlflow/).
demo: $(STAMP)
	$(BIN)/qlora demo-assets
	$(BIN)/qlora run --config $(CONFIG)

# A small demo hyper-parameter search (4 trials of 60 steps, Optuna grid over rank and learning rate);
# run it again and the study continues. Its best trial is registered like the nightly flow's adapter.
sweep: $(STAMP)
	$(BIN)/qlora demo-assets
	$(BIN)/qlora sweep --config configs/demo-sweep.yaml

# Nightly schedule from this process, for people without a work pool (see prefect.yaml otherwise).
serve: $(STAMP)
	$(BIN)/qlora serve --config $(CONFIG)

# The OpenAI-compatible model server for the registered adapters (config section `serving:`), on
# http://127.0.0.1:8000; follows the champion alias at runtime. Ctrl-C stops it.
serve-model: $(STAMP)
	$(BIN)/qlora serve-model --config $(CONFIG)

# Local Prefect server and MLflow UI on 127.0.0.1; Ctrl-C stops both.
ui: $(STAMP)
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"
	trap 'kill 0' INT TERM; \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & \
	MLFLOW_PORT=$(MLFLOW_PORT) PATH="$(CURDIR)/$(BIN):$$PATH" bash mlflow/server.sh & \
	wait

mlflow-ui: $(STAMP)
	MLFLOW_PORT=$(MLFLOW_PORT) PATH="$(CURDIR)/$(BIN):$$PATH" bash mlflow/server.sh

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Serving load and memory benchmarks (needs two registered versions: run `make demo` twice).
bench-serving: $(STAMP)
	$(BIN)/python -m bench.serving

# The server stack without Docker: PostgreSQL on 127.0.0.1:5432 (QLORA_STACK_POSTGRES_URL), MLflow with
# basic auth and a Prefect server on it, the demo flow run against both. Also part of `make test`.
stack-test: $(STAMP)
	$(BIN)/python -m pytest tests/test_stack.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
