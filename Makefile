# streamkm — common tasks. Each target sets up what it needs (virtualenv, install, broker fetch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install demo test test-unit test-integration chaos-full fuzz-long lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,report]'
	@touch $@

install: $(STAMP) ## create .venv and install streamkm with its test/dev extras

demo: $(STAMP) ## stream a realistic workload through the daemon on a local Apache Kafka
	$(VENV)/bin/streamkm demo --report demo.png

test: $(STAMP) ## the whole test suite (unit + integration against a real Apache Kafka)
	bash scripts/ensure-tools.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

test-unit: $(STAMP) ## unit tests only (no broker)
	$(PY) -m pytest -m unit

test-integration: $(STAMP) ## integration tests only
	bash scripts/ensure-tools.sh
	$(PY) -m pytest -m "integration or chaos"

chaos-full: $(STAMP) ## the full-scale chaos run (200k+ messages, 5 SIGKILLs, a broker restart)
	STREAMKM_CHAOS_SCALE=full $(PY) -m pytest -m chaos -v

fuzz-long: $(STAMP) ## the long fuzz run: 400 Hypothesis streams per mode, 50k malformed messages per format
	bash scripts/ensure-tools.sh
	FUZZ_EXAMPLES=400 FUZZ_BAD=50000 $(PY) -m pytest tests/integration/test_fuzz.py -v

lint: $(STAMP) ## ruff + mypy
	$(VENV)/bin/ruff check streamkm tests bench
	$(VENV)/bin/ruff format --check streamkm tests bench
	$(VENV)/bin/mypy

format: $(STAMP) ## apply ruff's formatting
	$(VENV)/bin/ruff format streamkm tests bench

bench: $(STAMP) ## model benchmarks against scikit-learn (speed, quality, anomaly)
	$(PY) bench/bench_speed.py
	$(PY) bench/bench_quality.py
	$(PY) bench/bench_anomaly.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
