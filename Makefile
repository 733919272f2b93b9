# Every target creates .venv and installs first, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-unit test-e2e lint serve bench bench-kvtransfer bench-cluster bench-router bench-disagg bench-vs-vllm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest tests/unit tests/e2e

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-e2e: install
	$(BIN)/python -m pytest tests/e2e

serve: install
	$(BIN)/python -m pdserve.cli serve

bench: install
	$(BIN)/python scripts/bench_engine.py

bench-kvtransfer: install
	$(BIN)/python scripts/bench_kvtransfer.py

bench-cluster: install
	$(BIN)/python scripts/bench_cluster.py

bench-router: install
	$(BIN)/python scripts/bench_router.py

bench-disagg: install
	$(BIN)/python scripts/bench_disagg.py

bench-vs-vllm: install
	$(BIN)/python scripts/bench_vs_vllm.py

clean:
	rm -rf $(VENV) .pytest_cache
