# make run   - build .venv and serve on http://127.0.0.1:8080 (embedded backends, tiny offline engine)
# make test  - build .venv with the test tools and run ruff, mypy and the whole test suite
# make lock  - re-resolve the locks after a change to pyproject's dependencies (LOCK_ARGS=--upgrade: newest allowed)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
LOCK_ARGS ?=

# uv builds the environments from the locks. pip bootstraps it into a folder of its own (--target: no venv
# module, no --user site, no PATH change, and no clash with a system-managed Python; it works as root in CI),
# pinned so every machine resolves and installs the same way. The folder is named after the version, so bumping
# it here reinstalls it. uv is a single binary: the folder needs no Python of its own.
UV_VERSION := 0.13.9
TOOLS := .venv-tools
UV := $(TOOLS)/uv-$(UV_VERSION)/bin/uv

# uv does not read pip's configuration. Where a machine keeps wheels in find-links folders (the CPU build of
# torch that the lock pins), PIP_FIND_LINKS names them, or else pip's configuration does, and uv is told the
# same. Expanded only by the recipes that install or lock, so other targets do not pay for starting pip.
FIND_LINKS = $(foreach dir,$(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links \
	2>/dev/null)),--find-links "$(dir)")

# The locks are for development and CI: CPython 3.11 on Linux x86-64, whatever machine runs `make lock`.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
DEV_LOCK := requirements-dev.lock
RUN_LOCK := requirements.lock
# Each lock records the sha256 of the pyproject tables it was resolved from (dependencies, extras, build
# requirements, Python version), so an install refuses a lock that pyproject has moved away from instead of
# resolving something new. Other edits to pyproject (tool settings) leave the locks valid.
DEPS_SHA = $(PYTHON) -c 'import hashlib, json, tomllib; d = tomllib.load(open("pyproject.toml", "rb")); \
	p = d["project"]; t = [d["build-system"]["requires"], p["requires-python"], p["dependencies"], \
	p.get("optional-dependencies", {})]; print(hashlib.sha256(json.dumps(t, sort_keys=True).encode()).hexdigest())'
BUILD_REQUIRES = $(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'
check_lock = @want="\# pyproject-deps-sha256: $$($(DEPS_SHA))"; grep -qxF "$$want" $(1) || { \
	echo "$(1) does not match pyproject.toml's dependencies: run 'make lock' and commit the lock" >&2; exit 1; }
# The build requirements are locked too, and the project is built from them without isolation, so no unpinned
# setuptools is fetched at install time.
sync = $(UV) pip sync --quiet --python $(BIN)/python --require-hashes $(FIND_LINKS) $(1) && \
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .

.PHONY: install install-dev lock run test lint typecheck pytest bench clean

install: $(VENV)/.installed

$(UV):
	rm -rf $(TOOLS)
	PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--target $(TOOLS)/uv-$(UV_VERSION) uv==$(UV_VERSION)

# Made only when the interpreter is missing: whatever is left of that venv is broken, so it is cleared.
$(VENV)/bin/python: | $(UV)
	$(UV) venv --quiet --clear --no-python-downloads --python $(PYTHON) $(VENV)

# A runtime sync removes the test tools, if they were there, so it takes the dev stamp with them.
$(VENV)/.installed: pyproject.toml $(RUN_LOCK) | $(UV) $(VENV)/bin/python
	$(call check_lock,$(RUN_LOCK))
	$(call sync,$(RUN_LOCK))
	rm -f $(VENV)/.installed-dev
	touch $@

install-dev: $(VENV)/.installed-dev

# The dev lock holds everything the runtime lock does, at the same versions, so it satisfies `install` too.
$(VENV)/.installed-dev: pyproject.toml $(DEV_LOCK) | $(UV) $(VENV)/bin/python
	$(call check_lock,$(DEV_LOCK))
	$(call sync,$(DEV_LOCK))
	touch $(VENV)/.installed $@

# The dev lock is resolved first (keeping its pins where pyproject still allows them); the runtime lock is
# then held to the dev lock's versions, so both environments run the same code.
lock: | $(UV)
	$(call lock_one,$(DEV_LOCK),--extra diffusers --extra aws --extra dev)
	$(call lock_one,$(RUN_LOCK),--extra diffusers --extra aws --constraint $(DEV_LOCK))

# Resolved into a scratch copy (uv keeps the pins of the file it writes), then the header is put in front.
# Without the find-links folder, torch==2.13.0 would resolve to the CUDA build and its gigabytes of
# dependencies: such a lock is refused before it replaces the committed one.
lock_one = cp $(1) $(TOOLS)/$(1) 2>/dev/null || true; \
	$(BUILD_REQUIRES) | $(UV) pip compile --quiet $(LOCK_TARGET) --generate-hashes --no-header $(FIND_LINKS) \
		$(LOCK_ARGS) pyproject.toml - $(2) -o $(TOOLS)/$(1) && \
	{ grep -q '^torch==[^ ]*+cpu ' $(TOOLS)/$(1) || { echo "torch did not resolve to its CPU build: \
		name the folder that holds the torch +cpu wheel in PIP_FIND_LINKS" >&2; exit 1; }; } && \
	{ echo "\# Made by 'make lock' from pyproject.toml for CPython 3.11 on Linux x86-64; do not edit."; \
	  echo "\# pyproject-deps-sha256: $$($(DEPS_SHA))"; cat $(TOOLS)/$(1); } > $(1)

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
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
