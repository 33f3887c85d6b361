# qwen-deploy: `make setup` once, then `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
# The real Qwen2.5-Coder-0.5B-Instruct (GGUF from PyPI, converted once), kept outside git and
# reused across clones; the tests find it through this variable.
REAL_MODEL ?= $(HOME)/.cache/qwen-deploy/qwen2.5-coder-0.5b-instruct
export QWEN_DEPLOY_REAL_MODEL := $(REAL_MODEL)
# A second real model of other shapes (Qwen2.5-Coder-1.5B-Instruct: 28 layers, hidden 1536), on
# which the parity presets and quantize gates are checked too
REAL_MODEL_2 ?= $(HOME)/.cache/qwen-deploy/qwen2.5-coder-1.5b-instruct
export QWEN_DEPLOY_REAL_MODEL_2 := $(REAL_MODEL_2)

.PHONY: setup real-model real-model-2 test demo lint format clean triton-env cpp-deps interop-env openvino-peer \
	lmeval-env

$(BIN)/qwen-deploy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: the CPU build; any other spec pulls GBs of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/qwen-deploy

# the fetch and the conversion each write to a temp name and rename: no half-written model
$(REAL_MODEL)/checkpoint/config.json: | $(BIN)/qwen-deploy
	$(BIN)/python scripts/fetch_real_model.py $(REAL_MODEL)
	$(BIN)/qwen-deploy convert-gguf $(REAL_MODEL)/model.gguf -o $(REAL_MODEL)/checkpoint --force

real-model: setup $(REAL_MODEL)/checkpoint/config.json

$(REAL_MODEL_2)/checkpoint/config.json: | $(BIN)/qwen-deploy
	$(BIN)/python scripts/fetch_real_model.py $(REAL_MODEL_2) qwen2.5-coder-1.5b-instruct
	$(BIN)/qwen-deploy convert-gguf $(REAL_MODEL_2)/model.gguf -o $(REAL_MODEL_2)/checkpoint --force

real-model-2: setup $(REAL_MODEL_2)/checkpoint/config.json

test: setup real-model real-model-2
	$(BIN)/pytest -q

demo: setup real-model
	$(BIN)/qwen-deploy export $(REAL_MODEL)/checkpoint -o $(DEMO)/artifact --force
	$(BIN)/qwen-deploy parity $(DEMO)/artifact --reference $(REAL_MODEL)/checkpoint --steps 8
	@echo "--- streamed chat with Qwen2.5-Coder-0.5B-Instruct (greedy, its chat template) ---"
	printf 'Write a Python function is_prime(n). Reply with the code and a one-line example only.\n' | \
		$(BIN)/qwen-deploy chat $(DEMO)/artifact --max-tokens 200

lint: setup
	$(BIN)/ruff check qwen_deploy tests benchmarks scripts
	$(BIN)/ruff format --check qwen_deploy tests benchmarks scripts

format: setup
	$(BIN)/ruff format qwen_deploy tests benchmarks scripts
	$(BIN)/ruff check --fix qwen_deploy tests benchmarks scripts

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

# Peers that load our artifacts as they are, each in its own venv (Optimum pins transformers
# < 4.58; torch pinned to the local CPU build): tests/export/test_interop.py runs them.
.venv-genai/.ready:
	$(PY) -m venv .venv-genai
	.venv-genai/bin/pip install -q onnxruntime-genai
	touch $@

.venv-optimum/.ready:
	$(PY) -m venv .venv-optimum
	.venv-optimum/bin/pip install -q torch==2.13.0 optimum-onnx onnxruntime
	touch $@

interop-env: .venv-genai/.ready .venv-optimum/.ready

# OpenVINO int4 of the real model, a peer in `benchmarks/peers/compare.py --openvino`: optimum-intel
# exports it in its own venv (it pulls torchvision and a CUDA torch: put back the CPU build, drop
# the rest); openvino-genai, which runs it, goes into .venv (the `openvino` extra).
OPENVINO_ENV := .venv-openvino
OPENVINO_MODEL := $(REAL_MODEL)/openvino-int4
$(OPENVINO_ENV)/.ready:
	$(PY) -m venv $(OPENVINO_ENV)
	$(OPENVINO_ENV)/bin/pip install -q torch==2.13.0 "optimum-intel[openvino]"
	$(OPENVINO_ENV)/bin/pip freeze | grep -E '^(torchvision|nvidia-|cuda-|triton)' | cut -d= -f1 | \
		xargs -r $(OPENVINO_ENV)/bin/pip uninstall -q -y
	$(OPENVINO_ENV)/bin/pip install -q --force-reinstall --no-deps torch==2.13.0
	touch $@

$(OPENVINO_MODEL)/openvino_model.xml: | $(OPENVINO_ENV)/.ready $(REAL_MODEL)/checkpoint/config.json
	rm -rf $(OPENVINO_MODEL).tmp
	$(OPENVINO_ENV)/bin/optimum-cli export openvino --model $(REAL_MODEL)/checkpoint \
		--task text-generation-with-past --weight-format int4 $(OPENVINO_MODEL).tmp
	mv $(OPENVINO_MODEL).tmp $(OPENVINO_MODEL)

openvino-peer: setup $(OPENVINO_MODEL)/openvino_model.xml
	$(BIN)/pip install -q -e ".[openvino]"

# lm-eval (benchmarks/lm_eval.py), in its own venv with the transformers, peft and datasets its
# hf backend brings; torch pinned first to the CPU build (any other spec pulls GBs of CUDA wheels).
LMEVAL_ENV := .venv-lmeval
$(LMEVAL_ENV)/.ready:
	$(PY) -m venv $(LMEVAL_ENV)
	$(LMEVAL_ENV)/bin/pip install -q --upgrade pip
	$(LMEVAL_ENV)/bin/pip install -q torch==2.13.0
	$(LMEVAL_ENV)/bin/pip install -q "lm-eval[api,hf]==0.4.13"
	touch $@

lmeval-env: $(LMEVAL_ENV)/.ready

# Headers for the C++ example (examples/cpp): onnxruntime's and nlohmann/json from Debian packages.
cpp-deps:
	bash examples/cpp/fetch_deps.sh build/cpp-deps

clean:
	rm -rf $(DEMO) build .pytest_cache
