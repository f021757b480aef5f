# The two commands of the Quick start are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STACK := bash scripts/stack.sh
PYTEST_ARGS ?=

.PHONY: venv stack-up stack-down stack-status test faults soak unit lint format demo bench bench-stages deploy-check clean
BENCH_ARGS ?=
STAGES_ARGS ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

# The services, the ClickHouse cluster (2 shards x 2 replicas) the cluster tests use, and the
# Redis Sentinel and Redis Cluster topologies of the dedup store's tests.
stack-up:
	$(STACK) up --cluster --redis-sentinel --redis-cluster

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

# Unit tests, then integration tests against the real Kafka, Redis and ClickHouse (one server,
# and the cluster: CLUSTER_ENV adds its name and nodes, CLICKHOUSE_URL stays the one server;
# and the Redis Sentinel and Redis Cluster addresses, REDIS_URL stays the one Redis).
CLUSTER_ENV = $(STACK) env --cluster --redis-sentinel --redis-cluster | grep -E '^export (CLICKHOUSE_CLUSTER|CLICKHOUSE_NODES|ZOOKEEPER_HOSTS|REDIS_SENTINELS|REDIS_SENTINEL_MASTER|REDIS_SENTINEL_NODES|REDIS_CLUSTER_NODES)='
test: venv stack-up
	bash scripts/toxiproxy.sh up
	eval "$$($(STACK) env)" && eval "$$($(CLUSTER_ENV))" && $(PY) -m pytest $(PYTEST_ARGS)

# The fault suite alone, and its long soak variant.
faults: venv stack-up
	bash scripts/toxiproxy.sh up
	eval "$$($(STACK) env)" && $(PY) -m pytest tests/faults $(PYTEST_ARGS)

soak: venv stack-up
	bash scripts/toxiproxy.sh up
	eval "$$($(STACK) env)" && $(PY) -m pytest tests/faults -m slow $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: venv stack-up
	eval "$$($(STACK) env)" && $(PY) scripts/demo.py

# Throughput, ceilings, peer, delay, memory (benchmarks/README.md). Prints the table.
bench: venv stack-up
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench]'
	eval "$$($(STACK) env)" && eval "$$($(CLUSTER_ENV))" && $(PY) -m benchmarks.run $(BENCH_ARGS)

# The worker's steps per event on one core, no services (benchmarks/stages.py).
bench-stages: venv
	$(PY) -m benchmarks.stages $(STAGES_ARGS)

deploy-check:
	bash scripts/check-deploy.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
