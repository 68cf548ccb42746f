# Two commands: `make train` and `make test`. Both create .venv and install the project first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/local.yaml
DATA ?=
EPOCHS ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast lint format bench device-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	touch $@

install: $(VENV)/.installed

# make train [DATA=<folder|archive|URL>] [EPOCHS=N] [CONFIG=configs/x.yaml] [ARGS="--set optim.lr=1e-3"]
train: install
	$(PY) jobs/train.py --config $(CONFIG) $(if $(DATA),--data $(DATA)) $(if $(EPOCHS),--set optim.epochs=$(EPOCHS)) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: tests/unit, in-process (under 2 minutes on 2 cores: docs/testing.md).
test-fast: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: install
	$(PY) bench/throughput.py

# Every figure a first GPU run must bring back, and the gpu tests, on this machine's first GPU (one
# "skipped" line without CUDA). Installs nothing: a lent GPU machine has torch and no registry, so it
# runs with .venv's python when there is one, else $(PYTHON). Make the sample it carries first, where
# the real sample is: python bench/device_check.py --make-sample
device-check:
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/device_check.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
