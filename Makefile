# qwen-deploy: `make setup` once, then `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: setup test demo lint format clean

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

lint: setup
	$(BIN)/ruff check qwen_deploy tests benchmarks
	$(BIN)/ruff format --check qwen_deploy tests benchmarks

format: setup
	$(BIN)/ruff format qwen_deploy tests benchmarks
	$(BIN)/ruff check --fix qwen_deploy tests benchmarks

clean:
	rm -rf $(DEMO) build .pytest_cache
