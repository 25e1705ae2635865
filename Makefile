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

## Everything CI runs: lint, types, unit (with its coverage floor), integration and end-to-end
## tests on the real engine, and the tests against the real cluster (tests/cluster/, and the
## Kubernetes end-to-end tests), which it builds and starts.
test: setup cluster lint unit
	$(PY)/python -m pytest -q tests/integration tests/e2e tests/cluster

## ruff (rules and formatting), mypy --strict over the package, benchmarks and tests, and the
## import contracts of pyproject.toml (which package may import what).
lint:
	$(PY)/ruff check .
	$(PY)/ruff format --check .
	$(PY)/mypy
	$(PY)/lint-imports

## Unit tests need no engine. The shell around the pure core is covered in-process (fake engine,
## fake backend): each of these stays at 80 % or more, and the package as a whole too.
COVERAGE_FLOOR := 80
COVERED := composemirror/ops.py composemirror/cli.py composemirror/engine.py 'composemirror/backends/*'

unit:
	$(PY)/python -m pytest -q tests/unit --cov=composemirror --cov-report= \
		--cov-fail-under=$(COVERAGE_FLOOR)
	@for part in $(COVERED); do \
		$(PY)/coverage report --include="$$part" --fail-under=$(COVERAGE_FLOOR) >/dev/null \
		|| { echo "unit coverage of $$part is under $(COVERAGE_FLOOR) %:"; \
		     $(PY)/coverage report --include="$$part" --show-missing; exit 1; }; \
	done
	@echo "unit coverage of each of $(COVERED): $(COVERAGE_FLOOR) % or more"

bench: setup
	$(PY)/python -m benchmarks

## A real single-node Kubernetes built from upstream components (scripts/cluster, cluster/).
cluster:
	@scripts/cluster up

cluster-down:
	@scripts/cluster down
