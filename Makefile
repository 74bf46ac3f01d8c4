# vaelab's commands (see README). Every target builds on `setup`, which is idempotent.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
# DVC stages run `python`: it must be the venv's, so the venv comes first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test test-quick test-slow ui dashboard bench params lock lint clean

setup: $(VENV)/.installed
	@if [ -z "$$VAELAB_FASHION_MNIST" ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
	    && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  echo "vaelab: installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "vaelab: apt could not install dataset-fashion-mnist; prepare falls back to torchvision's download"; \
	fi
	@if [ ! -d .dvc ]; then \
	  if git rev-parse --git-dir >/dev/null 2>&1; then dvc init -q; else dvc init -q --no-scm; fi; fi
	@dvc config core.analytics false

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	@test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@# pip.conf's local indexes hold only some packages; pip warns once per missing one. Drop that noise.
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[dev]' 2>&1 \
	  | grep -v "^WARNING: Location 'file://"; test $${PIPESTATUS[0]} -eq 0
	@touch $@

repro: setup
	dvc repro
	@echo; echo "Test metrics (metrics/eval.json; 'dvc metrics show' has them all):"
	@$(PYTHON) -c 'import json; m = json.load(open("metrics/eval.json")); \
	  print("\n".join(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}" for k, v in sorted(m.items())))'
	@echo; echo "Compare runs in the MLflow UI: make ui  (then open http://127.0.0.1:5000)"

test: setup
	$(PYTHON) -m pytest -m "not slow"

# The quick tier, for iterating: no training runs and no subprocesses (pyproject.toml's markers), under 2 minutes.
test-quick: setup
	$(PYTHON) -m pytest -m "not slow and not integration and not subprocess"

test-slow: setup
	$(PYTHON) -m pytest -m slow

# The MLflow UI on this project's store. tests/test_browser.py checks its compare view in headless Chromium.
# It has no login, so it listens on this machine only. `make ui UI_HOST=0.0.0.0` opens it to the network; only a
# command-line value can: a plain `=` here outranks an environment variable of the same name.
UI_HOST = 127.0.0.1
UI_PORT = 5000
UI_STORE = sqlite:///$(CURDIR)/mlflow.db
# One worker: enough for one person browsing, where MLflow's default of four would each hold a copy of the app.
UI_WORKERS = 1
# The server's libraries warn of their own deprecations (starlette's WSGI middleware), which no user can act on.
ui: export PYTHONWARNINGS = ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated
ui: setup
	@if [ "$(UI_HOST)" != 127.0.0.1 ] && [ "$(UI_HOST)" != localhost ]; then \
	  echo "vaelab: warning: the MLflow UI has no authentication; anyone who reaches $(UI_HOST):$(UI_PORT) can read and change runs"; fi
	@$(PYTHON) -m vaelab.tracking.ui --store $(UI_STORE) --address http://$(UI_HOST):$(UI_PORT)
	mlflow ui --backend-store-uri $(UI_STORE) --host $(UI_HOST) --port $(UI_PORT) --workers $(UI_WORKERS)

# optuna-dashboard on the searches' study storage (hydra.sweeper.storage), with the plots each search's report
# uploads as study artifacts. Like the MLflow UI it has no login, so it listens on this machine only.
OPTUNA_STORAGE = sqlite:///$(CURDIR)/optuna.db
OPTUNA_ARTIFACTS = $(CURDIR)/optuna_artifacts
DASHBOARD_PORT = 8080
dashboard: setup
	@mkdir -p $(OPTUNA_ARTIFACTS)
	@echo "Optuna dashboard: open http://127.0.0.1:$(DASHBOARD_PORT) (Ctrl-C stops it)"
	optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port $(DASHBOARD_PORT) --artifact-dir $(OPTUNA_ARTIFACTS)

# Training throughput against a bare PyTorch loop and pythae, plus IW-NLL evaluation speed (benchmarks/README.md).
bench: setup
	$(PYTHON) benchmarks/throughput.py $(ARGS)

# Recompose params.yaml (DVC's copy of the config) after editing conf/.
params: setup
	$(PYTHON) -m vaelab.params

# Refresh the exact pins after changing dependency ranges in pyproject.toml.
lock: setup
	{ sed -n '1,3p' requirements/constraints.txt; $(PYTHON) -m pip freeze --exclude-editable; } > requirements/constraints.tmp
	mv requirements/constraints.tmp requirements/constraints.txt

# ruff, then the layer contracts in pyproject.toml (import-linter): which layer may import what.
lint: setup
	$(VENV)/bin/ruff check src pipelines tests
	$(VENV)/bin/ruff format --check src pipelines tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf outputs mlartifacts mlflow.db mlflow.db.lock optuna.db optuna.db.lock data/raw test-artifacts
