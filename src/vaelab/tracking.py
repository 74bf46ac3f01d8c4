"""MLflow tracking: the store, the run, its lineage. One run id links output folder, checkpoint and evaluation.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.errors import StoreLockedError

PARAM_BATCH = 100  # MLflow's limit on params per log_batch call
STORE_LOCK_TIMEOUT_S = 30.0  # default of tracking.lock_timeout_s
TAG_PREFIX = "vaelab."
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another


def default_uri() -> str:
    return f"sqlite:///{paths.store_root() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or default_uri()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """An absolute artifact folder beside a sqlite store (MLflow defaults to ./mlruns); a server picks its own."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts" / experiment).as_uri() if db else None


class StoreClient:
    """An MlflowClient whose calls wait out a locked sqlite store instead of failing at once.

    Another process writing the store (a sweep's jobs, `mlflow ui`, a user's script) holds sqlite's lock; each
    attempt already waits 5 s for it (sqlite's busy timeout). Up to `lock_timeout_s` more, calls are retried;
    after that, a StoreLockedError names the store. A locked call committed nothing, so retrying never doubles
    a write, and the store is never left half-written."""

    def __init__(self, uri: str, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S):
        from mlflow import MlflowClient

        self.uri = uri
        self.lock_timeout_s = lock_timeout_s
        self._client = self._retry(MlflowClient, "opening the store", uri)  # a new store is created on first use

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self._retry(attribute, name, *args, **kwargs)

    def _retry(self, call, what: str, *args: Any, **kwargs: Any) -> Any:
        deadline, delay = time.monotonic() + self.lock_timeout_s, 0.25
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as error:
                if "database is locked" not in str(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreLockedError(
                        f"the MLflow store {self.uri} stayed locked by another process for over "
                        f"{self.lock_timeout_s:.0f} s (tracking.lock_timeout_s), so {what} wrote nothing. "
                        "Find the process holding it (e.g. `fuser` on the .db file), or raise the timeout"
                    ) from error
                time.sleep(delay)
                delay = min(2 * delay, 2.0)


def ensure_experiment(uri: str, experiment: str, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S) -> str:
    """The experiment's id, creating the store and the experiment on first use.

    A fresh sqlite store races when several processes create its schema at once, so first use is
    serialized with a file lock beside the database.
    """
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock") if db else nullcontext():
        client = StoreClient(uri, lock_timeout_s)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))


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
    """{'model': {'beta': 1.0}} -> {'model.beta': '1.0'}: the composed config as MLflow params."""
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
        lock_timeout_s = float(cfg.tracking.get("lock_timeout_s", STORE_LOCK_TIMEOUT_S))
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

    def lightning_logger(self, logger_cfg: DictConfig) -> MLFlowLogger:
        from hydra.utils import instantiate

        logger = instantiate(logger_cfg, experiment_name=self.experiment, tracking_uri=self.uri, run_id=self.run_id)
        logger._mlflow_client = self.client  # its per-epoch metrics wait out a locked store too
        return logger

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


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, minus ending the run: vaelab ends it after its own post-fit logging."""

    def finalize(self, status: str = "success") -> None:
        pass


class ServerRunLogger(RunLogger):
    """`logger=mlflow_server`: the same logger; its name tells validation that tracking.uri must be a server."""


SERVER_SCHEMES = ("http://", "https://")
HEALTH_TIMEOUT_S = 5.0


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(SERVER_SCHEMES)


def check_server(uri: str | None) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer: MLflow's client would otherwise
    retry for minutes, or the run would train without being logged."""
    if not is_server(uri):
        return
    import urllib.error
    import urllib.request

    from vaelab.errors import VaelabError

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise VaelabError(
        f"the MLflow tracking server at {uri} cannot be reached ({problem}). Start it (e.g. `mlflow server "
        f"--host 127.0.0.1 --port 5000`), or leave tracking.uri unset to log to the local sqlite store."
    )
