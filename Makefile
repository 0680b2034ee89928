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

.PHONY: install install-test serve test lint bento image load-test bench cold-start runpod clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	touch $@

serve: install
	$(BIN)/bentoml serve service:EmbeddingService --port $(PORT)

lint: install-test
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

runpod: install
	$(BIN)/python -m runpod_adapter $(RUNPOD_ARGS)

clean:
	rm -rf $(VENV) build reports
