# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
# `make run PHASE=1 PORT=8001` serves another phase, on another port.
PHASE ?= 3
HOST ?= 127.0.0.1
PORT ?= 8000
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint setup clean

$(BIN)/taskman: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/taskman

run: setup
	$(BIN)/taskman serve --phase $(PHASE) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A narrated live tour of the phases, e.g. `make demo DEMO_ARGS="--phase 2 --pause"`.
.PHONY: demo
demo: setup
	$(BIN)/taskman demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .taskman .pytest_cache .mypy_cache .ruff_cache
