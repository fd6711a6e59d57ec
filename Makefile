# One command runs the main job (`make demo`), one passes the tests (`make test`).
# Both create the virtualenv and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit pytest openapi clean bench bench-shutdown bench-api bench-memory bench-faults

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,test]'
	touch $(STAMP)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash vault-dev/demo.sh

lint: venv
	$(BIN)/ruff check broker tests bench vault-dev
	$(BIN)/ruff format --check broker tests bench vault-dev

typecheck: venv
	$(BIN)/mypy

# The fast subset: no Vault server, no subprocess.
unit: venv
	$(BIN)/pytest -m unit -q

# Everything, in parallel (one dev server per worker).
pytest: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -n auto

test: lint typecheck pytest

# The control API's OpenAPI document, rebuilt from the models (a test checks it is current).
openapi: venv
	$(BIN)/python -c 'import json; from broker.api import openapi; print(json.dumps(openapi.document(), indent=2, sort_keys=True))' > openapi.json

clean:
	rm -rf $(VENV) .vault-dev .mypy_cache .ruff_cache .pytest_cache

# The broker against `bao agent` and the raw-HTTP floor, N = 10/100/1000 (bench/README.md).
# Byte-compiled first, as an installed package is (PYTHONDONTWRITEBYTECODE would hide it).
bench: venv
	$(BIN)/python -m compileall -q broker >/dev/null
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.compare

# Sidecar prepare latency at N = 10/100 and its shutdown with 20 active executions.
bench-shutdown: venv
	$(BIN)/python -m bench.sidecar

# Control API requests per second: Environment GET and execution create (~15 s).
bench-api: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.api

# Does the sidecar forget? RSS after 100 vs 10,000 prepare/end cycles (several minutes).
bench-memory: venv
	$(BIN)/python -m bench.memory

# Recovery from Vault faults: 503 for 20 s, 429 Retry-After 7, a killed Raft leader (~2 min).
bench-faults: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.faults
