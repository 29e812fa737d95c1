# Two commands set everything up from a fresh clone: `make demo` and `make test`.
# Both create or reuse .venv, install netsim with its dev extras, and (as root) the lab's Debian packages.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# A second venv with the lowest versions pyproject.toml allows for every direct dependency, so a floor cannot lie.
# netsim itself is rebuilt in each compat venv (the build hook compiles the native accelerator for that
# interpreter), one install at a time: two concurrent uv builds of the same source share one editable wheel, and
# the second interpreter then got no accelerator (the 3.12 tier skipped the native tests).
COMPAT_INSTALL = flock $(VENV)/.compat-install.lock $(BIN)/uv pip install -q --refresh-package netsim --reinstall-package netsim
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.stamp-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: all setup sysdeps demo test lint typecheck docs pytest pytest-nonative pytest-lowest pytest-pythons compat bench bench-quick clean

all: test

# accel.c and the build hook too: `make setup` recompiles the native accelerator when they change (docs/native.md)
$(STAMP): pyproject.toml hatch_build.py netsim/_native/accel.c | sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import netsim, trio, pyroute2, pytun, scapy, hypothesis' 
	@$(BIN)/python -c 'import netsim.accel as a; print("netsim: native accelerator:", a.ACTIVE, "-", a.describe()["detail"])'
	@rm -f $(VENV)/.stamp-* && touch $@

setup: $(STAMP) sysdeps

sysdeps:
	@PYTHON=$(PYTHON) scripts/install-sysdeps.sh

demo: setup
	$(BIN)/netsim demo

lint: $(STAMP)
	$(BIN)/ruff check netsim tests examples
	$(BIN)/ruff format --check netsim tests examples

# tests/ is strict too, less warn_unreachable (tests assert on state that changes behind mypy's back, after an
# await) and comparison-overlap (tests compare enum members with Apple's raw integers on purpose).
typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --no-warn-unreachable --disable-error-code comparison-overlap tests

# The docs site (mkdocs.yml, strict: a broken link, a missing anchor or a docstring mkdocstrings cannot read fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir site

# Under CI the main run requires the native accelerator (NETSIM_NATIVE=1: a broken build fails instead of falling
# back to pure Python); pytest-nonative runs the tests of what it accelerates again on the pure-Python path.
NATIVE_ENV := $(if $(filter true,$(CI)),NETSIM_NATIVE=1,)
NONATIVE_TESTS := tests/test_native.py tests/core/wireguard tests/core/test_checksum.py tests/transports/test_tun_conformance.py \
  tests/transports/test_udp_gro.py

pytest: setup
	$(NATIVE_ENV) $(BIN)/pytest $(PYTEST_ARGS)

pytest-nonative: setup
	NETSIM_NATIVE=0 $(BIN)/pytest -q -p no:cacheprovider $(NONATIVE_TESTS)

$(LOWEST_STAMP): pyproject.toml $(STAMP)
	@$(BIN)/uv venv -q --allow-existing -p $(BIN)/python $(LOWEST)
	@VIRTUAL_ENV=$(LOWEST) $(COMPAT_INSTALL) --resolution lowest-direct -e '.[dev]'
	@rm -f $(LOWEST)/.stamp-* && touch $@

# The compatibility tiers: the unprivileged tests against the lowest allowed direct dependencies, and on every
# other Python the package says it supports (privileged gates skip there: the root tier runs once, above, with the
# current versions). They check that the suite runs, not search for new counterexamples, so property tests are
# capped at COMPAT_EXAMPLES examples each (tests/conftest.py); `make compat` runs the tiers side by side (one
# pytest per core; each tier's output is printed whole when it ends) so `.ci/run` stays inside its time budget.
COMPAT_EXAMPLES ?= 10
COMPAT_ENV := env -u NETSIM_REQUIRE_PRIVILEGED NETSIM_HYPOTHESIS_MAX_EXAMPLES=$(COMPAT_EXAMPLES)
pytest-lowest: $(LOWEST_STAMP)
	$(COMPAT_ENV) $(LOWEST)/bin/pytest -q -p no:cacheprovider -m "not lab and not tun" $(PYTEST_ARGS)

# Each other Python in its own venv (.venv-3.13, ...); scripts/find-python.sh finds the interpreter or has uv
# install one. `.ci/run` tests the oldest supported Python (3.11: the main run and the lowest-dependency tier) and
# the newest (3.13): three tiers side by side on two cores took ~10 min and put `.ci/run` at 41-44 min, over its
# 40-minute budget. The Pythons in between run with `make compat PYTHONS="3.12 3.13"`.
PYTHONS ?= 3.13
pytest-pythons: $(addprefix pytest-python-,$(PYTHONS))

pytest-python-%: $(STAMP)
	@py=$$(scripts/find-python.sh $* $(BIN)/uv) && echo "== Python $* ($$py)" && \
	  $(BIN)/uv venv -q --allow-existing -p $$py .venv-$* && \
	  VIRTUAL_ENV=.venv-$* $(COMPAT_INSTALL) -e '.[dev]' && \
	  .venv-$*/bin/python -c 'import netsim.accel as a; print("netsim: native accelerator:", a.ACTIVE)'
	$(COMPAT_ENV) .venv-$*/bin/pytest -q -p no:cacheprovider -m "not lab and not tun" \
	  --ignore=tests/test_wheel.py $(PYTEST_ARGS)

compat: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest-lowest pytest-pythons

test: setup lint typecheck docs pytest pytest-nonative compat

bench-quick: setup
	$(BIN)/netsim bench --quick

bench: setup
	$(BIN)/netsim bench --json results/bench.json --plot results/bench.png

clean:
	$(BIN)/netsim clean || true
	rm -rf $(VENV) $(LOWEST) site .mypy_cache .ruff_cache .pytest_cache .hypothesis
