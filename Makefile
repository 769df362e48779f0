# The two commands that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out

.PHONY: install test test-gpu lint demo bench-prune finetune-demo reproduce-digits reproduce-lstm clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch; from balprune.vision import torchvision; print('torch', torch.__version__, 'torchvision', torchvision().__version__)"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check src tests benchmarks

demo: install
	mkdir -p $(DEMO)
	$(BIN)/balprune example lstm-lm -o $(DEMO)/lstm-lm.pt --force
	$(BIN)/balprune prune $(DEMO)/lstm-lm.pt --blocks 32 --sparsity 0.9 -o $(DEMO)/lstm-lm.balanced.safetensors --force
	$(BIN)/balprune verify $(DEMO)/lstm-lm.balanced.safetensors
	$(BIN)/balprune inspect $(DEMO)/lstm-lm.balanced.safetensors

bench-prune: install
	$(BIN)/python benchmarks/prune_scale.py

# Algorithm 1 with fine-tuning on the digits shipped in the package (CPU, under half a minute).
finetune-demo: install
	mkdir -p $(DEMO)
	$(BIN)/balprune finetune configs/digits-balanced.toml --out $(DEMO)/digits-run --force
	$(BIN)/balprune verify $(DEMO)/digits-run/model.balanced.safetensors

# The accuracy comparisons of REPRODUCTION.md (CPU; a few minutes each).
REPRO := repro-out
reproduce-digits: install
	mkdir -p $(REPRO)
	$(BIN)/balprune sweep configs/digits-balanced.toml --patterns balanced,unstructured,block,vector \
	    --block-sizes 8,16,32 --block-shapes 4x4,8x8 --vector-lengths 4,8 \
	    --sparsities 0.5,0.75,0.8,0.875,0.9,0.9375 --out $(REPRO)/digits-sweep --device cpu --resume

reproduce-lstm: install
	mkdir -p $(REPRO)
	$(BIN)/balprune sweep configs/lstm-lm-finetune.toml --patterns balanced,unstructured,block,vector \
	    --sparsities 0.8,0.9 --out $(REPRO)/lstm-sweep --device cpu --resume

clean:
	rm -rf $(VENV) $(DEMO) $(REPRO) .pytest_cache .hypothesis .ruff_cache
