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

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf build

# A tritonserver for tests/test_triton.py: the binary and Python backend that PyPI's nvidia-pytriton wheel ships,
# unpacked (not installed: the wheel pins numpy<2). Not part of `make test`: its Python-backend stub misreads
# BYTES inputs under numpy 2, which sdrt's tests need, so the real-server tests skip there (tests/test_triton.py).
triton-server: | $(BIN)/python
	@if [ "$$(uname -sm)" = "Linux x86_64" ] && [ ! -x $(VENV)/pytriton/pytriton/tritonserver/bin/tritonserver ]; then \
	  $(BIN)/python -m pip download --quiet --no-deps nvidia-pytriton==0.7.0 -d $(VENV)/pytriton-wheel && \
	  $(BIN)/python -c 'import sys, zipfile, os; z = zipfile.ZipFile(sys.argv[1]); \
	    [(z.extract(i, sys.argv[2]), os.chmod(os.path.join(sys.argv[2], i.filename), (i.external_attr >> 16) or 0o644)) \
	     for i in z.infolist() if not i.is_dir()]' $(VENV)/pytriton-wheel/*.whl $(VENV)/pytriton; \
	fi
