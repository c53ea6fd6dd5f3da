# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-only lint bench bench-smoke clean

$(STAMP): pyproject.toml constraints/airflow-3.3.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,postgres]" -c constraints/airflow-3.3.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	bash .ci/system-deps.sh
	. .ci/services.sh && $(MAKE) --no-print-directory test-only

test-only: $(STAMP)
	$(BIN)/ruff check airflow_provider_mews dags_examples tests benchmarks scripts
	$(BIN)/ruff format --check airflow_provider_mews dags_examples tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix airflow_provider_mews dags_examples tests benchmarks scripts
	$(BIN)/ruff format airflow_provider_mews dags_examples tests benchmarks scripts
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

clean:
	rm -rf $(VENV) .demo .artifacts
