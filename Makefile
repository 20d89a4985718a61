# The two habits: `make test` and `make lint`. Every target installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
KAFKA := deploy/local/kafka
SCHEMA_REGISTRY := deploy/local/schema-registry
# The one version: pyproject.toml's. `personalize-worker --version` reads it (importlib.metadata), the image
# is tagged and labelled with it, deploy/k8s pins it (a test holds them equal).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= personalize-worker

.PHONY: venv kafka-jars schema-registry prometheus-tools proxy-tools test test-fast lint fmt demo bench chaos image version clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@echo "make: installing the project and its dev tools into $(VENV) (when pyproject.toml changes)" >&2
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q -U pip
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

kafka-jars:
	@$(KAFKA) fetch

# Apicurio Registry (Maven Central, ~140 MB, into .cache/): the real schema registry of the format tests.
schema-registry:
	$(SCHEMA_REGISTRY) fetch

# promtool and prometheus (Debian's `prometheus` package) for the alert-rule and scrape tests.
# Installed only when missing and only as root; the tests start the binary themselves, so the
# packaged service is stopped and disabled if the package's install script started it.
prometheus-tools:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "make: installing the Debian package 'prometheus' (promtool and prometheus, for the alert-rule and scrape tests) with apt-get" >&2; \
	  apt-get update -qq >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; \
	else echo "promtool not found and not root: the Prometheus tests will skip (apt-get install prometheus)" >&2; fi

# tinyproxy (Debian's package) for the HTTP proxy tests, which start their own on a free loopback port
# with their own config. Installed only when missing and only as root, like prometheus-tools; the
# packaged service (port 8888 on every interface) is stopped and disabled if the install started it.
proxy-tools:
	@if command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "make: installing the Debian package 'tinyproxy' (for the HTTP proxy tests) with apt-get" >&2; \
	  apt-get update -qq >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null \
	  && { systemctl disable --now tinyproxy >/dev/null 2>&1 || service tinyproxy stop >/dev/null 2>&1 || true; }; \
	else echo "tinyproxy not found and not root: the proxy tests will skip (apt-get install tinyproxy)" >&2; fi

# pytest exits 5 when it collected nothing: that must fail, never pass quietly.
test: venv kafka-jars schema-registry prometheus-tools proxy-tools
	$(BIN)/pytest -m "not slow_chaos" $(PYTEST_ARGS)

# The inner loop, ~2-3 minutes: unit tests and the real-broker integration tests, without the chaos
# scenarios and the end-to-end runs of the CLI (those are in `make test`).
test-fast: venv kafka-jars schema-registry
	$(BIN)/pytest -m "not chaos and not slow_chaos and not e2e and not slow" $(PYTEST_ARGS)

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
	@$(BIN)/personalize-worker demo

bench: venv kafka-jars
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# The container image, tagged with pyproject.toml's version (needs Docker; not run by the tests).
image:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

version:
	@echo $(VERSION)

clean:
	-$(KAFKA) stop
	-$(SCHEMA_REGISTRY) stop
	rm -rf $(VENV) .cache .bench .pytest_cache .mypy_cache .ruff_cache
