# xlb: every target sets itself up first (idempotent), so each works on a fresh machine.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test lint unit bench bench-quick bench-cluster bench-cluster-sim cluster-test clean

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m lab.demo

lint: setup
	.venv/bin/ruff check dpd policyd xlbcore lab tests bench scripts
	.venv/bin/mypy dpd policyd xlbcore lab

test: setup lint
	bash scripts/run_tests.sh

unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

# policyd reconciling N nodes x 10,000 services (docs/performance.md, "Reconciling at scale")
DATE := $(shell date -u +%Y-%m-%d)
bench-cluster: setup bench-cluster-sim
	$(PY) -m bench.cluster --datapath kernel --nodes 1 20 --kill 5 \
		--out bench/results/cluster-kernel-$(DATE).json

bench-cluster-sim: setup
	$(PY) -m bench.cluster --nodes 1 20 --per-process 1 --kill 5 \
		--out bench/results/cluster-sim-small-$(DATE).json
	$(PY) -m bench.cluster --nodes 50 100 200 --out bench/results/cluster-sim-$(DATE).json

# docker-compose.yml on a real Docker engine: build, bring up, check, tear down (docs/cluster.md).
# Needs no venv: it installs docker.io/docker-compose if missing and builds the image.
cluster-test:
	bash scripts/cluster_test.sh

clean:
	rm -rf .venv xlb build *.egg-info
