# Set-up and checks. Everything runs inside .venv, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
PYTEST_ARGS ?= -n 2 -q --durations=15
# The PyTorch to install: on the CI machines this release's CPU wheel is on disk. Elsewhere,
# e.g. make TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-tensorflow test-jax test-torch lint bench clean

$(STAMP): pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
# torch pinned: this release has a CPU-only wheel on the CI machines; an unpinned torch
# pulls the CUDA build (several GB) from the default index.
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[tensorflow,jax,examples,viz,tests]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && $$([ "$$(id -u)" = 0 ] || echo sudo -n) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver'; } || echo "warning: could not install chromium and chromedriver; the browser tests of keras_attn.viz will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=tensorflow $(BIN)/python -m examples.gpt demo

test: lint test-tensorflow test-jax test-torch

test-tensorflow: $(STAMP)
	KERAS_BACKEND=tensorflow $(BIN)/pytest $(PYTEST_ARGS) tests $(foreach p,$(PLUGINS),$(dir $(p))tests)

# XLA's CPU backend at optimization level 0: the tests' programs are small and compiled
# once each, so compiling dominates; about a quarter less CPU time, the same numbers.
test-jax: $(STAMP)
	KERAS_BACKEND=jax XLA_FLAGS="$(XLA_FLAGS) --xla_backend_optimization_level=0" $(BIN)/pytest $(PYTEST_ARGS) tests $(foreach p,$(PLUGINS),$(dir $(p))tests)

test-torch: $(STAMP)
	KERAS_BACKEND=torch $(BIN)/pytest $(PYTEST_ARGS) tests $(foreach p,$(PLUGINS),$(dir $(p))tests)

lint: $(STAMP)
	$(BIN)/ruff check keras_attn tests examples benchmarks plugins
	$(BIN)/ruff format --check keras_attn tests examples benchmarks plugins

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
