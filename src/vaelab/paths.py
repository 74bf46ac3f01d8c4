"""Where vaelab keeps things, relative to the project root (the README, "Where the results are").

Two roots, because `dvc exp run --temp` runs the stages in a temporary copy of the repository:
the *workspace* (data, outputs, models, metrics) is that copy, so DVC can collect the outputs,
while the *stores* (MLflow, Optuna) live in the original repository, which DVC names in $DVC_ROOT.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The workspace root: $VAELAB_ROOT (the entry points set it to their checkout), else the cwd."""
    return Path(os.environ.get("VAELAB_ROOT") or Path.cwd()).resolve()


def store_root() -> Path:
    """Where mlflow.db, mlartifacts/ and optuna.db live: $DVC_ROOT when DVC runs us, else the project."""
    return Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else project_root()


def processed_dir(dataset: str) -> Path:
    return project_root() / "data" / "processed" / dataset


def raw_dir(dataset: str) -> Path:
    return project_root() / "data" / "raw" / dataset


def run_dir(run_id: str) -> Path:
    return project_root() / "outputs" / run_id


def latest_model_dir() -> Path:
    return project_root() / "models" / "latest"


def metrics_dir() -> Path:
    return project_root() / "metrics"


def plots_dir() -> Path:
    return project_root() / "plots"
