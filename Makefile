# kvtuner-edge: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
VARIANT ?= cpu

.PHONY: setup engine tools tools-rpc demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the package as a user installs it (pip), then its patched llama.cpp engine (`kvtuner-edge engine build`:
# cached outside the clone, a second build takes seconds). torch: the pinned CPU wheel first (an unpinned
# torch would pull a CUDA build of several GB); on a GPU machine install your own CUDA torch into the venv
# before `make setup`
setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/kvtuner-edge engine build --variant $(VARIANT)

engine: setup

# the patched llama.cpp command-line tools (llama-server, llama-cli, llama-bench, llama-perplexity, llama-batched-bench)
tools: setup
	$(BIN)/kvtuner-edge engine build --variant $(VARIANT) --tools

# llama-server, llama-cli and ggml-rpc-server with llama.cpp's RPC backend (layers served by other machines)
tools-rpc: setup
	$(BIN)/python native/build.py --variant $(VARIANT) --tools --rpc

demo: setup
	$(BIN)/kvtuner-edge demo

# the tests, with the RPC tools of tests/test_rpc.py (llama.cpp's RPC backend: a separate build, cached like the engine)
test: setup
	$(BIN)/python native/build.py --variant $(VARIANT) --tools --rpc
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
