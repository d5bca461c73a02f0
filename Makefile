# kpimon: `make demo` runs the local demo, `make test` runs every test.
# Both do all set-up on a fresh machine (Python venv, Debian packages, Kafka jars).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/kpimon: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/kpimon
	bash scripts/install-system-deps
	$(BIN)/kpimon dev fetch

demo: setup
	$(BIN)/kpimon dev up
	$(BIN)/kpimon demo

lint: $(BIN)/kpimon
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	-$(BIN)/kpimon dev down
	rm -rf $(VENV) .kpimon
