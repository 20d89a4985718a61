# The two habits: `make test` and `make lint`. Every target installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
KAFKA := deploy/local/kafka

.PHONY: venv kafka-jars test lint fmt demo bench chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

kafka-jars:
	$(KAFKA) fetch

# pytest exits 5 when it collected nothing: that must fail, never pass quietly.
test: venv kafka-jars
	$(BIN)/pytest -m "not slow_chaos" $(PYTEST_ARGS)

chaos: venv kafka-jars
	$(BIN)/pytest -m "chaos" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff check --fix worker tests
	$(BIN)/ruff format worker tests

demo: venv kafka-jars
	$(BIN)/personalize-worker demo

bench: venv kafka-jars
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	-$(KAFKA) stop
	rm -rf $(VENV) .cache .bench .pytest_cache .mypy_cache .ruff_cache
