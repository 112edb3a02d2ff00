# make demo: a fresh clone -> .venv -> train-teachers then distill on the embedded digits data.
# make test: a fresh clone -> .venv -> the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean-outputs

venv: $(STAMP)

# Reinstalled whenever pyproject.toml changes. torch resolves to the newest release
# pyproject allows (<= 2.14.1).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/distillrun train-teachers
	$(BIN)/distillrun distill

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
