# fleetkey developer entry points. Everything installs into .venv from the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAYER_DIR := build/layer
# A working Python 3.12 (the Lambda runtime's version) to compile the layer's bytecode, if any.
PYTHON312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys' >/dev/null 2>&1 && { echo $$p; break; }; done)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1
export AWS_DEFAULT_REGION ?= eu-west-1

.PHONY: install demo serve lint test unit integration infra layer synth bench importtime clean \
	mosquitto

$(STAMP): pyproject.toml package.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The source roots on the path directly, so packages added later are seen without reinstalling.
	printf '%s\n' $(CURDIR)/layers/core/python $(CURDIR)/tooling $(CURDIR)/infra \
		> "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fleetkey-source.pth"
	npm install --no-audit --no-fund --silent
	touch $(STAMP)

install: $(STAMP)

# The Lambda layer: the core package plus its arm64 dependencies, without Docker.
$(LAYER_DIR)/.built: $(STAMP) $(shell find layers/core/python -name '*.py')
	rm -rf $(LAYER_DIR) && mkdir -p $(LAYER_DIR)/python
	$(BIN)/pip install --quiet --target $(LAYER_DIR)/python --platform manylinux2014_aarch64 \
		--python-version 3.12 --implementation cp --only-binary=:all: \
		'aws-lambda-powertools[tracer]==3.37.0' 'pydantic==2.12.5' 'cryptography==48.0.0' 'pyjwt==2.10.1' \
		'boto3==1.43.11'
	cp -r layers/core/python/fleetkey $(LAYER_DIR)/python/
	find $(LAYER_DIR) -name '__pycache__' -prune -exec rm -rf {} +
	# Lambda's code directories are read-only: without 3.12 bytecode in the layer every cold start
	# compiles from source (measured: import time 340 ms -> 700-820 ms).
	if [ -n "$(PYTHON312)" ]; then \
		$(PYTHON312) -m compileall -q -j 0 --invalidation-mode unchecked-hash $(LAYER_DIR)/python; \
	else echo "warning: no python3.12 found; the layer ships without bytecode"; fi
	touch $@

layer: $(LAYER_DIR)/.built

# mosquitto_pub, a stock MQTT client for tests/e2e/test_stock_clients.py, without root: Debian's
# packages fetched with `apt-get download` (into a private package list when the system's is
# missing) and unpacked with dpkg-deb into build/mosquitto, run through a wrapper that puts the
# unpacked libraries on LD_LIBRARY_PATH. Without apt-get, nothing is made (the test skips).
MOSQUITTO_DIR := build/mosquitto
MOSQUITTO_PACKAGES := mosquitto-clients libmosquitto1 libcjson1
MOSQUITTO_APT = -o Dir::State::Lists=$(CURDIR)/$(MOSQUITTO_DIR)/apt/lists \
	-o Dir::Cache=$(CURDIR)/$(MOSQUITTO_DIR)/apt/cache
$(MOSQUITTO_DIR)/.built:
	rm -rf $(MOSQUITTO_DIR) && mkdir -p $(MOSQUITTO_DIR)/debs
	if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
		echo "warning: no apt-get/dpkg-deb: mosquitto_pub not fetched (docs/stock-clients.md)"; \
	else \
		cd $(MOSQUITTO_DIR)/debs && { apt-get -q download $(MOSQUITTO_PACKAGES) || { \
			mkdir -p ../apt/lists/partial ../apt/cache/archives/partial && \
			apt-get -q $(MOSQUITTO_APT) update && \
			apt-get -q $(MOSQUITTO_APT) download $(MOSQUITTO_PACKAGES); }; } && cd $(CURDIR) && \
		for deb in $(MOSQUITTO_DIR)/debs/*.deb; do dpkg-deb -x $$deb $(MOSQUITTO_DIR)/root; done && \
		lib=$$(dirname $$(find $(CURDIR)/$(MOSQUITTO_DIR)/root -name libmosquitto.so.1)) && \
		mkdir -p $(MOSQUITTO_DIR)/bin && \
		printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$$@"\n' "$$lib" \
			"$(CURDIR)/$(MOSQUITTO_DIR)/root/usr/bin/mosquitto_pub" > $(MOSQUITTO_DIR)/bin/mosquitto_pub && \
		chmod +x $(MOSQUITTO_DIR)/bin/mosquitto_pub && \
		$(MOSQUITTO_DIR)/bin/mosquitto_pub --help | grep -q '^mosquitto_pub version'; \
	fi
	touch $@

mosquitto: $(MOSQUITTO_DIR)/.built

demo: $(STAMP)
	$(BIN)/python -m fleetkey_local.demo $(DEMO_ARGS)

serve: $(STAMP)
	$(BIN)/python -m fleetkey_local.serve $(SERVE_ARGS)

# Guardrails, before any test runs: lint, formatting, and strict types on what runs in Lambda (the
# core layer and every function; the files and settings are in pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(STAMP) $(LAYER_DIR)/.built $(MOSQUITTO_DIR)/.built
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

synth: $(STAMP) $(LAYER_DIR)/.built
	npx cdk synth --quiet

bench: $(STAMP)
	$(BIN)/python benchmarks/registration.py
	$(BIN)/python benchmarks/tokens.py
	$(BIN)/python benchmarks/validations.py

importtime: $(STAMP)
	$(BIN)/python benchmarks/importtime.py

clean:
	rm -rf $(VENV) build cdk.out node_modules
