"""Where vaelab keeps things, relative to the project root (the README, "Where the results are").

Two roots, because `dvc exp run --temp` runs the stages in a temporary copy of the repository:
the *workspace* (data, outputs, models, metrics) is that copy, so DVC can collect the outputs,
while the *stores* (MLflow, Optuna) live in the original repository, which DVC names in $DVC_ROOT.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def project_root() -> Path:
    """The workspace root: $VAELAB_ROOT (the entry points set it to their checkout), else the cwd."""
    return Path(os.environ.get("VAELAB_ROOT") or Path.cwd()).resolve()


def store_root() -> Path:
    """Where mlflow.db, mlartifacts/ and optuna.db live: $DVC_ROOT when DVC runs us, else the project. A queued
    DVC experiment (`dvc exp run --queue`, `--temp`) runs in a temporary copy, <repo>/.dvc/tmp/exps/<tmp>/, which
    DVC deletes afterwards: its runs go to the repository's own store."""
    if not os.environ.get("DVC_ROOT"):
        return project_root()
    root = Path(os.environ["DVC_ROOT"]).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def processed_dir(dataset: str) -> Path:
    return project_root() / "data" / "processed" / dataset


def raw_dir(dataset: str) -> Path:
    return project_root() / "data" / "raw" / dataset


# The files of one run, in outputs/<run_id>/, and of the published model, in models/latest/.
RUN_CONFIG = "config.yaml"  # the composed config the run trained with
CHECKPOINTS = "checkpoints"
BEST = "best.ckpt"  # the epoch with the highest val/elbo once the objective stopped changing
LAST = "last.ckpt"  # the end of the last complete epoch: what resume= continues from
INTERRUPTED = "interrupted.ckpt"  # the state at a Ctrl-C or SIGTERM
PUBLISHED_MODEL = "model.ckpt"  # models/latest/'s copy of the published run's best checkpoint
RUN_ID = r"[0-9a-f]{32}"  # MLflow's run ids; runs without MLflow get one of the same form
RUN_ID_FILE = "run_id"  # models/latest/'s, and a multirun job folder's, pointer to its run
FIGURES = "figures"  # the run's figures on val images
TRAIN_SUMMARY = "train.json"  # the run's summary metrics (metrics/train.json's content, when published)
EVALUATION = "evaluation"  # the run's test figures and kl_per_dim.csv (plots/eval/'s, when published)
EVAL_SUMMARY = "eval.json"  # the run's test metrics (metrics/eval.json's, when published)
PYFUNC_MODEL = "model"  # the MLflow pyfunc model folder, also the run's artifact path (runs:/<run_id>/model)


def outputs_dir() -> Path:
    return project_root() / "outputs"


def run_dir(run_id: str) -> Path:
    if not re.fullmatch(RUN_ID, str(run_id)):  # a name from a command line never leads out of outputs/
        raise ValueError(f"not a run id (32 hex digits): {run_id!r}")
    return outputs_dir() / run_id


def run_config(run_id: str) -> Path:
    return run_dir(run_id) / RUN_CONFIG


def checkpoints_dir(run_id: str) -> Path:
    return run_dir(run_id) / CHECKPOINTS


def best_checkpoint(run_id: str) -> Path:
    return checkpoints_dir(run_id) / BEST


def last_checkpoint(run_id: str) -> Path:
    return checkpoints_dir(run_id) / LAST


def interrupted_checkpoint(run_id: str) -> Path:
    return checkpoints_dir(run_id) / INTERRUPTED


def latest_model_dir() -> Path:
    return project_root() / "models" / "latest"


def published_model() -> Path:
    return latest_model_dir() / PUBLISHED_MODEL


def metrics_dir() -> Path:
    return project_root() / "metrics"


def plots_dir() -> Path:
    return project_root() / "plots"
