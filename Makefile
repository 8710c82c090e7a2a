# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use
# and reuse it afterwards (the stamp file is refreshed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdrt-installed
DEMO_DIR ?= build/demo

.PHONY: demo test venv clean triton-server

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel; then the project with its export, serve and test extras.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[export,serve,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sdrt.cli.demo $(DEMO_DIR)

test: $(STAMP) triton-server
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf build

# The real tritonserver tests/test_triton.py runs: PyPI's nvidia-pytriton wheel unpacked into the venv, with a venv for
# its Python-backend stub that holds numpy 1 (tests/triton_server_setup.py says why). Where it cannot be set up it
# says so and the real-server tests skip.
triton-server: | $(BIN)/python
	$(BIN)/python tests/triton_server_setup.py $(VENV)
