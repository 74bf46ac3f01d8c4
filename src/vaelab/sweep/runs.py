"""How a sweep's runs find each other: the parent's id handed to the jobs, the tags that make a job's run a child,
and the query that reads the children back.

Hydra multirun sweeps have one parent MLflow run per sweep and one nested child run per job. How the pieces meet:
- `SweepCallback` (vaelab.sweep.callback), a Hydra callback (conf/train.yaml, `hydra.callbacks`), runs in the
  launching process. `on_multirun_start` creates the MLflow store and experiment before any job starts, so parallel
  workers never race on a fresh sqlite schema. It then creates the parent run and hands its id to the jobs: in an
  environment variable, which joblib's worker processes inherit since they start later, and in a file in the sweep
  folder, for launchers that run jobs elsewhere.
- `run_job` (vaelab.sweep.jobs) trains one job as a nested child run (pipelines/train.py calls it in `-m` mode). A
  job that fails (an invalid config, a NaN loss, a crash) gets a FAILED child run, prints one line and returns NaN
  instead of raising. Otherwise Hydra's sweeper would raise after the batch and skip `on_multirun_end`.
- `on_multirun_end` reads the child runs back from MLflow rather than from the jobs' return values, since a
  parallel or remote launcher may not return them, and writes the summary (vaelab.sweep.summary) to
  outputs/<parent_run_id>/, logs it to the parent run and exits with status 1 if any job failed.

Sweeps select on validation metrics only: the best job is the one with the highest val/elbo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vaelab.paths import RUN_ID_FILE
from vaelab.redaction import redact_override, redact_text
from vaelab.tracking.run import TAG_PREFIX
from vaelab.tracking.store import process_tracking_uri

if TYPE_CHECKING:
    import pandas as pd

PARENT_ENV = "VAELAB_SWEEP_RUN_ID"  # the parent run's id, for the jobs
PARENT_FILE = "parent_run_id"  # the same, in the Hydra sweep folder
JOB_TAG = f"{TAG_PREFIX}sweep_job"  # a child run's Hydra job number
JOB_OVERRIDES_TAG = f"{TAG_PREFIX}job_overrides"  # a child run's overrides, as a JSON list
# Why a run's evaluation right after training (eval.after_train) failed, its training having finished: set by
# vaelab.stages.train, shown in the summary's failure column (defined here, so the summary need not load Lightning).
EVAL_FAILURE_TAG = f"{TAG_PREFIX}eval_failure"
SELECTION = "val/elbo"  # what picks the best job: validation only, higher is better
AGGREGATE_OVER = "seed"  # jobs that differ only in this key are one configuration
# The summary's metrics, as train() returns them: at the best checkpoint (val/nll_iw is estimated on it).
# Each child run also gets them as `best/<name>` metrics, since its `val/*` history ends at the last epoch.
METRICS = ("val/elbo", "val/nll_iw", "val/rec", "val/kl", "best_epoch")
# The test metrics a job logs when it is evaluated right after training (eval.after_train), as its run has them;
# the two gaps (and their standard errors) only with eval.gaps. Reported beside, never selected on.
TEST_METRICS = (
    "test/nll_iw",
    "test/elbo",
    "test/inference_gap",
    "test/approximation_gap",
    "test/approximation_gap_se",
    "test/amortization_gap",
    "test/amortization_gap_se",
    "test/kl",
    "test/active_units",
)
# Training images per second at a job's last epoch (the first pays for warm-up): what each configuration costs.
THROUGHPUT = "train/images_per_sec"
GAP_SPLIT = ("test/approximation_gap", "test/amortization_gap")  # each with its standard error, `<name>_se`


def child_metric(name: str) -> str:
    return f"best/{name.removeprefix('best_')}"  # val/elbo -> best/val/elbo, best_epoch -> best/epoch


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def short_error(error: BaseException) -> str:
    """One line: the exception's type and message (a ConfigError's problems, one per line, joined by `; `)."""
    text = str(error).strip()
    if "\n" in text:  # a ConfigError lists one problem per line
        text = "; ".join(line.strip() for line in text.splitlines()[1:]) or text.splitlines()[0]
    return redact_text(f"{type(error).__name__}: {text}")


def parent_run_id(sweep_dir: str) -> str:
    """The sweep's parent run: from the launching process's environment, else from the sweep folder."""
    found = os.environ.get(PARENT_ENV)
    if not found and (Path(sweep_dir) / PARENT_FILE).is_file():
        found = (Path(sweep_dir) / PARENT_FILE).read_text().strip()
    if not found:
        raise RuntimeError(
            "this multirun job has no parent MLflow run: conf/train.yaml's hydra.callbacks.vaelab_sweep must be set"
        )
    return found


def split_override(override: str) -> tuple[str, str]:
    """`+objective.beta=4` -> ("objective.beta", "4")."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def job_tags(num: int, overrides: list[str]) -> dict[str, str]:
    return {JOB_TAG: str(num), JOB_OVERRIDES_TAG: json.dumps([redact_override(o) for o in overrides])}


def find_child(uri: str, parent: str, overrides: str, since_ms: int) -> str | None:
    """The child run that a job with these overrides (as the `vaelab.overrides` tag has them) started after
    `since_ms`, if train() got as far as making it."""
    import pandas as pd

    runs = child_runs(uri, parent).reindex(columns=["run_id", "start_time", f"tags.{TAG_PREFIX}overrides"])
    if runs.empty:  # no child yet: its start_time column is not one of times
        return None
    started = runs["start_time"] >= pd.to_datetime(since_ms, unit="ms", utc=True)
    found = runs.loc[started & (runs[f"tags.{TAG_PREFIX}overrides"] == overrides), "run_id"]
    return None if found.empty else str(found.iloc[0])


def child_runs(uri: str, parent: str, deleted: bool = False) -> pd.DataFrame:
    """Every run nested under `parent`, in any experiment of the store (a job may override tracking.experiment):
    one row per run, with `tags.*` and `metrics.*` columns as mlflow.search_runs names them. With `deleted`, the
    deleted runs too, marked in a `deleted` column: a job whose run was deleted still ran."""
    import mlflow
    from mlflow.entities import ViewType

    query = {"filter_string": f"tags.mlflow.parentRunId = '{parent}'", "search_all_experiments": True}
    with process_tracking_uri(uri):
        if not deleted:
            return mlflow.search_runs(**query)
        runs = mlflow.search_runs(**query, run_view_type=ViewType.ALL)
        gone = mlflow.search_runs(**query, run_view_type=ViewType.DELETED_ONLY).reindex(columns=["run_id"])
    return runs.assign(deleted=runs.reindex(columns=["run_id"])["run_id"].isin(gone["run_id"]))


CHECKED_SWEEPER = "hydra_plugins.vaelab_sweeper.checked_sweeper.CheckedSweeper"  # the default: conf/train.yaml
OPTUNA_SWEEPER = "hydra_plugins.vaelab_sweeper.optuna_sweeper.OptunaSweeper"  # hydra/sweeper=optuna: a search


def launched_jobs(sweeper: DictConfig, overrides: list[str]) -> list[list[str]] | None:
    """The overrides of every job Hydra's basic sweeper (or vaelab's, which is one) launches for these sweeper
    settings and command line, in job order (what its `sweep` expands them to); None for another sweeper, or a sweep
    it cannot expand here."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    basic = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
    if sweeper.get("_target_") not in (basic, CHECKED_SWEEPER):
        return None
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()] + list(overrides)
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception:  # noqa: BLE001 - e.g. a glob over config groups, which needs Hydra's config loader
        return None
    return [job for batch in batches for job in batch]


def job_pointers(sweep_dir: str | Path) -> dict[int, str]:
    """The run id each job's Hydra folder points to (`<sweep_dir>/<job>/run_id`), by job number."""
    found = {}
    for pointer in Path(sweep_dir).glob(f"*/{RUN_ID_FILE}"):
        if pointer.parent.name.isdigit():
            found[int(pointer.parent.name)] = pointer.read_text().strip()
    return found
