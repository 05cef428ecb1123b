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

.PHONY: install demo test lint demo-assets mlflow-ui ui serve bench stack-test clean

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

demo: $(STAMP)
	$(BIN)/qlora demo-assets
	$(BIN)/qlora train --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
