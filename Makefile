# The two commands that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out

.PHONY: install test test-gpu lint demo bench-prune clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
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

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .hypothesis .ruff_cache
