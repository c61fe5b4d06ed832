# The two commands a new user types: `make run` and `make test`.
# Each creates .venv and installs the project when the venv is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export WANDB_MODE ?= offline
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/wsss run configs/default.yaml

# the tests include the import-layering check (tests/test_layering.py); ruff lints and checks the format
lint: $(STAMP)
	$(VENV)/bin/ruff check wsss tests scripts
	$(VENV)/bin/ruff format --check wsss tests scripts

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache
