# scl-lightning developer tasks (GNU make). `make` or `make help` lists them.
#
# Every target that runs project code depends on $(STAMP), whose recipe creates the local
# virtual environment $(VENV) and installs the tested pins from constraints.txt. So
# `make train` and `make test` each work alone on a fresh clone, and re-install when
# pyproject.toml or constraints.txt changes.

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
# Use a shell that is on every system; multi-command recipes start with `set -e`.
SHELL := /bin/sh

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Overridable: make train CONFIG=configs/digits_mlp_dense.yaml ARGS="--trainer.max_epochs 5"
CONFIG ?= configs/digits_mlp.yaml
ARGS ?=
# Benchmarks to run; a script whose name starts with "_" is a helper, not a benchmark.
# The Fashion-MNIST result studies take hours: `make results` runs them (`make bench` does not).
RESULTS_BENCH := bench/frontier.py bench/ablations.py bench/scl_variants.py bench/mask_diagnosis.py bench/budgets.py
BENCH ?= $(filter-out bench/_% $(RESULTS_BENCH),$(sort $(wildcard bench/*.py)))

# torch is installed first, on its own and pinned: an unpinned torch pulls GBs of CUDA packages.
TORCH_REQ := $(shell grep -m1 -E '^torch==' constraints.txt 2>/dev/null)

# Only those that exist: git does not keep an empty bench/, and ruff reports a missing path.
LINT_PATHS := $(wildcard src tests bench)

.PHONY: help install data train test test-full lint format bench results clean distclean constraints

help: ## list the targets (default)
	@echo "Usage: make <target> [CONFIG=path.yaml] [ARGS='extra arguments']"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv and install the pinned dependencies and the package (editable)

$(STAMP): pyproject.toml constraints.txt
	@set -e; if [ -z "$(TORCH_REQ)" ]; then \
	  echo "error: constraints.txt has no 'torch==' pin; refusing to install an unpinned torch" >&2; \
	  exit 1; fi
	@set -e; if [ ! -x $(BIN)/python ]; then \
	  echo "creating $(VENV) with $$($(PYTHON) --version 2>&1)"; \
	  $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt "$(TORCH_REQ)"
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	@touch $@

define DOWNLOAD_FMNIST
import sys
from scl_lightning.data import FashionMNISTDataModule as D
d = D()
try:
    d.prepare_data()
except (OSError, ValueError) as err:
    sys.exit(f"error: could not install Fashion-MNIST ({err}); as root on Debian/Ubuntu, apt-get install dataset-fashion-mnist")
print("Fashion-MNIST downloaded to", d.folder)
endef
export DOWNLOAD_FMNIST

# Where Fashion-MNIST is found (empty when it is not): the DataModule's own search order.
FIND_FMNIST := $(BIN)/python -c "from scl_lightning.data import FashionMNISTDataModule as D; print(D(download=False).folder or '')"

data: $(STAMP) ## install Fashion-MNIST: Debian's dataset-fashion-mnist as root, else a checked download
	@set -e; found=$$($(FIND_FMNIST)); \
	if [ -n "$$found" ]; then echo "Fashion-MNIST is already installed in $$found"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist (apt-get, as root)"; \
	  if apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     { apt-get update -qq >/dev/null 2>&1 && \
	       apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; then \
	    found=$$($(FIND_FMNIST)); fi; \
	  if [ -n "$$found" ]; then echo "Fashion-MNIST installed in $$found (Debian package)"; exit 0; fi; \
	  echo "apt-get could not install dataset-fashion-mnist; downloading instead"; \
	fi; \
	echo "downloading Fashion-MNIST from the upstream URLs (checked by MD5)"; \
	$(BIN)/python -c "$$DOWNLOAD_FMNIST"

train: $(STAMP) ## train the recipe CONFIG (default configs/digits_mlp.yaml); ARGS passed to `scl fit`
	$(BIN)/scl fit --config $(CONFIG) $(ARGS)

test: $(STAMP) ## run the default test tier (not slow, not gpu); ARGS passed to pytest
	@set -e; rc=0; $(BIN)/python -m pytest $(ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

test-full: $(STAMP) ## run every test: slow too, gpu ones where CUDA is present; ARGS passed to pytest
	@set -e; rc=0; $(BIN)/python -m pytest -m "" $(ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

lint: $(STAMP) ## ruff check, ruff format --check and mypy
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

bench: $(STAMP) ## run each bench/*.py in turn (BENCH=bench/x.py for one)
	@set -e; if [ -z "$(strip $(BENCH))" ]; then echo "no benchmarks found in bench/"; exit 0; fi; \
	for script in $(BENCH); do \
	  echo "==> $$script"; \
	  $(BIN)/python "$$script"; \
	done

results: data ## the Fashion-MNIST studies of docs/RESULTS.md (hours); ARGS=--quick for minutes
	@set -e; for script in $(RESULTS_BENCH); do \
	  echo "==> $$script $(ARGS)"; \
	  $(BIN)/python "$$script" $(ARGS); \
	done

constraints: ## rewrite constraints.txt from the packages now in .venv (keeps its header)
	@set -e; if [ ! -x $(BIN)/python ]; then echo "error: no $(VENV); run 'make install' first" >&2; exit 1; fi; \
	{ grep '^#' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > constraints.txt.new; \
	mv constraints.txt.new constraints.txt; \
	echo "constraints.txt: $$(grep -c '^[^#]' constraints.txt) pins"

clean: ## remove caches and build artefacts (keeps .venv and runs/)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too (keeps runs/)
	rm -rf $(VENV)
