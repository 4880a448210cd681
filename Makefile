# xlb: every target sets itself up first (idempotent), so each works on a fresh machine.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test lint unit bench bench-quick clean

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

clean:
	rm -rf .venv xlb build *.egg-info
