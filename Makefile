# make run   - build .venv and serve on http://127.0.0.1:8080 (embedded backends, tiny offline engine)
# make test  - build .venv with the test tools and run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install install-dev run test lint typecheck pytest bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[diffusers,aws]'
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[diffusers,aws,dev]'
	touch $@

run: install
	$(BIN)/sdasync serve $(ARGS)

lint: install-dev
	$(BIN)/ruff check src tests bench

typecheck: install-dev
	$(BIN)/mypy

pytest: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(ARGS)

test: lint typecheck pytest

bench: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_engines.py --repeat 5
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
