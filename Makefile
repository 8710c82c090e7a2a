# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use
# and reuse it afterwards (the stamp file is refreshed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdrt-installed
DEMO_DIR ?= build/demo

.PHONY: demo test venv clean triton-server browser transformers4

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel; then the project with its export, serve and test extras.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[export,serve,test]'
	# PuLID's references for tests/test_pulid_eva.py, without their dependencies (torchvision does not import against
	# this torch; the tests load the two model files they need from these packages' folders)
	$(BIN)/python -m pip install --quiet --no-deps consisid-eva-clip==1.0.2 facexlib==0.3.0 einops==0.8.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sdrt.cli.demo $(DEMO_DIR)

test: $(STAMP) triton-server browser transformers4
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf build

# The real tritonserver tests/test_triton.py runs: PyPI's nvidia-pytriton wheel unpacked into the venv, with a venv for
# its Python-backend stub that holds numpy 1 (tests/triton_server_setup.py says why). Where it cannot be set up it
# says so and the real-server tests skip.
triton-server: | $(BIN)/python
	$(BIN)/python tests/triton_server_setup.py $(VENV)

# Debian's chromium and chromium-driver for tests/test_playground.py (the page driven in a real headless browser).
# Where they cannot be installed (no root, no apt) it says so and those tests skip with the reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "browser: chromium and chromium-driver could not be installed; tests/test_playground.py skips"; }

# transformers 4 (what optimum pins, < 4.58) in a side venv, without torch, for tests/test_export_bookkeeping.py: an
# engine's tokenizer folder must load there too. Where it cannot be made (no PyPI) it says so and that test skips.
transformers4: | $(BIN)/python
	@test -f $(VENV)/tf4/.sdrt-ready || { rm -rf $(VENV)/tf4 && $(BIN)/python -m venv $(VENV)/tf4 && \
	  $(VENV)/tf4/bin/python -m pip install --quiet 'transformers<4.58' tokenizers >/dev/null 2>&1 && \
	  touch $(VENV)/tf4/.sdrt-ready; } || \
	  { rm -rf $(VENV)/tf4; echo "transformers4: could not make a transformers 4 venv; its tokenizer test skips"; }
