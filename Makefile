# The two commands of the README, and their parts. Each target sets up what is missing first.
PY := .venv/bin
EXAMPLE := examples/local-database/compose.yaml

.PHONY: setup demo demo-down test lint unit bench cluster cluster-down

setup:
	@scripts/setup

## The main job: the local-database example against the sandbox cluster.
demo: setup
	$(PY)/composemirror -f $(EXAMPLE) up -d
	@curl -fsS --retry 30 --retry-connrefused --retry-delay 1 http://localhost:8080/
	@echo "(running: open http://localhost:8080, stop with 'make demo-down')"

demo-down: setup
	$(PY)/composemirror -f $(EXAMPLE) down

## Everything CI runs: lint, types, unit, integration and end-to-end tests on the real engine,
## and the tests against the real cluster (tests/cluster/), which it builds and starts.
test: setup cluster lint
	$(PY)/python -m pytest -q

lint:
	$(PY)/ruff check .
	$(PY)/mypy

unit:
	$(PY)/python -m pytest -q tests/unit

bench: setup
	$(PY)/python -m benchmarks

## A real single-node Kubernetes built from upstream components (scripts/cluster, cluster/).
cluster:
	@scripts/cluster up

cluster-down:
	@scripts/cluster down
