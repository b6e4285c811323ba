# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test bench clean serve

setup: $(STAMP)

# Re-install only when the package definition or the frozen versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	test -d .git || git init -q
	test -d .dvc || $(BIN)/dvc init -q
	touch $(STAMP)

run: setup
	$(BIN)/restorl repro

# ruff (pyproject.toml), then two pytest workers (pytest-xdist), each test file on one of them:
# module fixtures stay shared and the end-to-end files run side by side. TEST_WORKERS=1 runs the suite in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Serve prefect.yaml's deployments from this machine; needs PREFECT_API_URL (docs/prefect.md).
serve: setup
	$(BIN)/python -m flows.serve

bench: setup
	$(BIN)/python bench/sft_speed.py

clean:
	rm -rf data/prepared data/difficulty.csv checkpoints metrics plots mlflow.db mlartifacts .restorl
