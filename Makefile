# Pin the CPU build of torch where there is no GPU: an unpinned torch pulls several GB of CUDA wheels.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: install install-test test test-all test-deepspeed lint demo format

install:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"
# Debian's chromium for the tree viewer's browser test (skipped with a message where it cannot be installed).
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium) ) || true

test: install-test
	$(PYTHON) -m pytest -q

test-all: install-test
	$(PYTHON) -m pytest -q -m "not gpu"

# DeepSpeed ZeRO-2/3 on the CPU (2 processes, gloo): both trainers, 3 steps each (~1.5 min, +1 min to compile once)
test-deepspeed: install-test
	$(PIP) install -q -e ".[test,deepspeed]"
	$(PYTHON) -m pytest -q -m deepspeed

lint:
	ruff check src tests recipes benchmarks
	ruff format --check src tests recipes benchmarks

format:
	ruff check --fix src tests recipes benchmarks
	ruff format src tests recipes benchmarks

demo: install
	$(PYTHON) recipes/pipeline.py --config recipes/configs/toy.yaml
