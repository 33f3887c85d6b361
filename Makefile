# qwen-deploy: `make setup` once, then `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: setup test demo lint format clean triton-env cpp-deps

$(BIN)/qwen-deploy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: the CPU build; any other spec pulls GBs of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/qwen-deploy

test: setup
	$(BIN)/pytest -q

demo: setup
	$(BIN)/qwen-deploy random-checkpoint $(DEMO)/checkpoint --force
	$(BIN)/qwen-deploy export $(DEMO)/checkpoint -o $(DEMO)/artifact --force
	$(BIN)/qwen-deploy parity $(DEMO)/artifact --reference $(DEMO)/checkpoint --steps 8
	@echo "--- streamed chat with the demo artifact (random weights: the words are noise) ---"
	printf 'What is a convertible bond?\n' | \
		$(BIN)/qwen-deploy chat $(DEMO)/artifact --max-tokens 48 --seed 1

lint: setup
	$(BIN)/ruff check qwen_deploy tests benchmarks
	$(BIN)/ruff format --check qwen_deploy tests benchmarks

format: setup
	$(BIN)/ruff format qwen_deploy tests benchmarks
	$(BIN)/ruff check --fix qwen_deploy tests benchmarks

# Triton, isolated from .venv: nvidia-pytriton bundles tritonserver + Python backend and pins
# numpy<2, so it gets its own venv, which also runs the Python-backend model (qwen-deploy -e).
TRITON_ENV := .venv-triton
TRITON_PKG := $(TRITON_ENV)/lib/python*/site-packages/pytriton/tritonserver
$(TRITON_ENV)/.ready: pyproject.toml
	$(PY) -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/pip install -q --upgrade pip
	$(TRITON_ENV)/bin/pip install -q nvidia-pytriton==0.7.0 -e .
	# the Python backend stub built for this venv's Python goes next to libtriton_python.so
	cp $(TRITON_PKG)/python_backend_stubs/$$($(TRITON_ENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')/triton_python_backend_stub $(TRITON_PKG)/backends/python/
	touch $@

triton-env: $(TRITON_ENV)/.ready

# Headers for the C++ example (examples/cpp): onnxruntime's and nlohmann/json from Debian packages.
cpp-deps:
	bash examples/cpp/fetch_deps.sh build/cpp-deps

clean:
	rm -rf $(DEMO) build .pytest_cache
