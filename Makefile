# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: demo test test-only lint bench bench-smoke screenshots package docs clean

$(STAMP): pyproject.toml constraints/airflow-3.3.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,demo,postgres]" -c constraints/airflow-3.3.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Installs Chromium/PostgreSQL only as root; without them their tests skip and are listed at
# the end with how to enable them (MEWS_REQUIRE_ALL_TESTS=1 turns those skips into failures).
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

# Refreshes the docs' screenshots (docs/img/*.png, also shown by the README) from the real UI; tests never write them.
screenshots: $(STAMP)
	bash .ci/system-deps.sh
	MEWS_UPDATE_SCREENSHOTS=1 MEWS_REQUIRE_ALL_TESTS=1 $(BIN)/pytest -q tests/ui

# The documentation site (docs/, MyST Markdown + autodoc) into docs/_build/html; any warning fails.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[docs]" -c constraints/airflow-3.3.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Builds the wheel and sdist, checks them and smoke-tests the installed wheel (as CI does).
package:
	bash .ci/package.sh

clean:
	rm -rf $(VENV) .demo .artifacts dist docs/_build
