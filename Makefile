# Two entry points for a fresh machine: `make serve` and `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Installed alone and first: a looser torch requirement pulls several GB of CUDA wheels on CPU hosts.
TORCH ?= torch==2.13.0
# What serve_config.yaml admits (admission.max_inflight_requests x the Ingress's num_replicas): the
# proxy refuses past it before routing (deployments/proxy.py). `llava-serve serve` works it out.
EDGE_MAX_INFLIGHT ?= 128
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install serve test test-fast lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Ray Serve's documented high-throughput mode (README, "Operating it"), on a one-machine Ray
# cluster with token auth and every Ray socket on loopback (README, "Security").
serve: install
	RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
		RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:middlewares \
		LLAVA_SERVE_EDGE_MAX_INFLIGHT=$(EDGE_MAX_INFLIGHT) \
		$(VENV)/bin/serve run serve_config.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The whole suite, as CI runs it.
test: lint
	$(PY) -m pytest -q

# Everything but tests/e2e/ (no Ray cluster): a few minutes.
test-fast: lint
	$(PY) -m pytest -q -m "not e2e"

bench: install
	$(PY) benchmarks/serve.py sweep --rounds 2
