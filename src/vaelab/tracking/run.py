"""An MLflow run and its lineage. One run id links the output folder, the checkpoint and the evaluation.

vaelab creates the run itself, before training, so the run id can name `outputs/<run_id>/`; Lightning's
MLFlowLogger then attaches to it. vaelab also owns the run's end: FINISHED only after the checkpoint,
figures and metrics are logged, FAILED (with the reason as a tag) when anything raised, KILLED on Ctrl-C.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaelab.tracking.store import STORE_LOCK_TIMEOUT_S, StoreClient, ensure_experiment, resolve_uri

PARAM_BATCH = 100  # MLflow's limit on params per log_batch call
TAG_PREFIX = "vaelab."
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another


SECRET_WORDS = ("password", "token", "secret")
REDACTED = "***"
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def is_secret(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_WORDS)


def redact_override(override: str) -> str:
    """`db.password=hunter2` -> `db.password=***`, for the overrides and command recorded as tags."""
    key, sep, _ = override.partition("=")
    return f"{key}{sep}{REDACTED}" if sep and is_secret(key) else override


def loggable_params(cfg: DictConfig) -> dict[str, str]:
    """The composed config as MLflow params, minus what must not be stored there.

    A key naming a password, token or secret logs `***`. A value read from the environment, directly or through
    other keys (`${oc.env:...}`), logs its unresolved interpolation, never the variable's value."""
    resolved = flatten(OmegaConf.to_container(cfg, resolve=True))
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))

    def from_environment(key: str, seen: frozenset[str] = frozenset()) -> bool:
        for reference in _INTERPOLATION.findall(raw.get(key, "")):
            if reference.startswith("oc.env"):
                return True
            if reference not in seen and reference in raw and from_environment(reference, seen | {key}):
                return True
        return False

    return {
        key: REDACTED if is_secret(key) else raw[key] if from_environment(key) else value
        for key, value in resolved.items()
    }


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """{'objective': {'beta': 1.0}} -> {'objective.beta': '1.0'}: the composed config as MLflow params."""
    if isinstance(node, dict):
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: str(node)}


def _git(*args: str) -> str | None:
    """Ask git about the checkout the running vaelab code comes from (the code is what needs a commit)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def lineage_tags(cfg: DictConfig, stage: str, overrides: list[str], extra: dict[str, str]) -> dict[str, str]:
    """Tags that let a person get from the run back to code, data and the command that made it."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}git_commit": commit or "unknown",
        f"{TAG_PREFIX}git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        f"{TAG_PREFIX}overrides": " ".join(redact_override(o) for o in overrides),
        f"{TAG_PREFIX}command": shlex.join([Path(sys.executable).name, *map(redact_override, sys.argv)]),
        **{f"{TAG_PREFIX}{k}": v for k, v in extra.items()},
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Run:
    """An MLflow run that vaelab created and will end. `log_*` methods are thin, explicit client calls."""

    def __init__(self, uri: str, run_id: str, experiment: str, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S):
        self.uri = uri
        self.run_id = run_id
        self.experiment = experiment
        self.client = StoreClient(uri, lock_timeout_s)

    @classmethod
    def create(
        cls,
        cfg: DictConfig,
        stage: str,
        overrides: list[str],
        tags: dict[str, str],
        parent_run_id: str | None = None,
        log_params: bool = True,
    ) -> Run:
        """Create the run with its params (the flattened composed config) and lineage tags.

        With `parent_run_id` it is a nested child (a sweep's job, a search's trial): the MLflow UI groups it under
        the parent. A parent itself usually logs no params (`log_params=False`): its children carry them.
        """
        from mlflow.entities import Param

        uri = resolve_uri(cfg.tracking.uri)
        lock_timeout_s = float(cfg.tracking.lock_timeout_s)
        experiment_id = ensure_experiment(uri, cfg.tracking.experiment, lock_timeout_s)
        run = cls(uri, "", cfg.tracking.experiment, lock_timeout_s)
        all_tags = lineage_tags(cfg, stage, overrides, tags)
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        info = run.client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=all_tags).info
        run.run_id = info.run_id
        if not log_params:
            return run
        params = loggable_params(cfg)
        if params.get("tracking.uri") == cfg.tracking.uri != uri:  # as given (not from the environment), relative
            params["tracking.uri"] = uri  # the sqlite file it named, absolute
        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), PARAM_BATCH):
            run.client.log_batch(run.run_id, params=items[start : start + PARAM_BATCH])
        return run

    @classmethod
    def attach(cls, uri: str | None, run_id: str) -> Run:
        """An existing run (e.g. to log evaluation results into the training run)."""
        uri = resolve_uri(uri)
        run = cls(uri, run_id, "")
        run.experiment = run.client.get_experiment(run.client.get_run(run_id).info.experiment_id).name
        return run

    @classmethod
    def reopen(cls, uri: str | None, run_id: str) -> Run:
        """A killed, failed or stopped run made RUNNING again, to resume it. Its params stay as first logged."""
        run = cls.attach(uri, run_id)
        tags = run.client.get_run(run_id).data.tags
        failure = tags.get(f"{TAG_PREFIX}failure")
        if failure:  # kept for the record, but no longer what the run ended with
            run.client.set_tag(run_id, f"{TAG_PREFIX}previous_failure", failure)
            run.client.delete_tag(run_id, f"{TAG_PREFIX}failure")
        run.client.set_tag(run_id, f"{TAG_PREFIX}resumes", str(int(tags.get(f"{TAG_PREFIX}resumes", "0")) + 1))
        run.client.update_run(run_id, status="RUNNING")
        return run

    def monitor_system(self, resume: bool = False):
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, GPU when present) for this run,
        sampled in a background thread until `.finish()`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str, reason: str | None = None) -> None:
        """Mark the run FINISHED, FAILED or KILLED; a failure reason goes into the `vaelab.failure` tag."""
        if reason:
            self.client.set_tag(self.run_id, f"{TAG_PREFIX}failure", reason[:5000])
        self.client.set_terminated(self.run_id, status)
