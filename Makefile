# The two habits: `make test` and `make lint`. Every target installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
KAFKA := deploy/local/kafka
SCHEMA_REGISTRY := deploy/local/schema-registry

.PHONY: venv kafka-jars schema-registry prometheus-tools proxy-tools test lint fmt demo bench chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

kafka-jars:
	$(KAFKA) fetch

# Apicurio Registry (Maven Central, ~140 MB, into .cache/): the real schema registry of the format tests.
schema-registry:
	$(SCHEMA_REGISTRY) fetch

# promtool and prometheus (Debian's `prometheus` package) for the alert-rule and scrape tests.
# Installed only when missing and only as root; the tests start the binary themselves, so the
# packaged service is stopped and disabled if the package's install script started it.
prometheus-tools:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
	  && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; \
	else echo "promtool not found and not root: the Prometheus tests will skip (apt-get install prometheus)" >&2; fi

# tinyproxy (Debian's package) for the HTTP proxy tests, which start their own on a free loopback port
# with their own config. Installed only when missing and only as root, like prometheus-tools; the
# packaged service (port 8888 on every interface) is stopped and disabled if the install started it.
proxy-tools:
	@if command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's tinyproxy for the proxy tests" >&2; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tinyproxy \
	  && { systemctl disable --now tinyproxy >/dev/null 2>&1 || service tinyproxy stop >/dev/null 2>&1 || true; }; \
	else echo "tinyproxy not found and not root: the proxy tests will skip (apt-get install tinyproxy)" >&2; fi

# pytest exits 5 when it collected nothing: that must fail, never pass quietly.
test: venv kafka-jars schema-registry prometheus-tools proxy-tools
	$(BIN)/pytest -m "not slow_chaos" $(PYTEST_ARGS)

chaos: venv kafka-jars schema-registry
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
	-$(SCHEMA_REGISTRY) stop
	rm -rf $(VENV) .cache .bench .pytest_cache .mypy_cache .ruff_cache
