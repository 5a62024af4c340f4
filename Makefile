# The two commands of the README: `make quickstart` (set up + main job) and `make test`.
VENV ?= .venv
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup quickstart test lint serve stop bench

setup:
	./scripts/setup.sh

quickstart: setup
	./scripts/quickstart.sh

test: setup
	$(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

serve:
	$(VENV)/bin/vlp serve

stop:
	$(VENV)/bin/vlp stop

bench:
	$(VENV)/bin/python benchmarks/ingest.py
