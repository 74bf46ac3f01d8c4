"""An MLflow run and its lineage. One run id links the output folder, the checkpoint and the evaluation.

vaelab creates the run itself, before training, so the run id can name `outputs/<run_id>/`; Lightning's
MLFlowLogger then attaches to it. vaelab also owns the run's end: FINISHED only after the checkpoint,
figures and metrics are logged, FAILED (with the reason as a tag) when anything raised, KILLED on Ctrl-C.

Every param and tag a run gets passes vaelab.redaction's rule on the way: no secret reaches the store.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaelab.redaction import redact_config, redact_override, redact_text, redact_url
from vaelab.tracking.store import STORE_LOCK_TIMEOUT_S, StoreClient, ensure_experiment, resolve_uri

PARAM_BATCH = 100  # MLflow's limit on params per log_batch call
TAG_PREFIX = "vaelab."
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another
MAX_RUN_NAME = 250  # characters: the width of MLflow's run name column in a database store
SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # `training`, `evaluation`: what the run used the dataset for
DIGEST_LENGTH = 32  # hex digits of the data hash that name a dataset's version: MLflow's digest holds at most 36


def public_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as vaelab writes it anywhere (config.yaml, a checkpoint's lineage, MLflow params, a
    search's best config): secrets as `***`, values from the environment as their `${oc.env:...}` interpolation
    (vaelab.redaction has the rule). Reading it back resolves those from the environment again."""
    return redact_config(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(cfg, resolve=True))


def loggable_params(cfg: DictConfig) -> dict[str, str]:
    """The composed config as MLflow params, minus what must not be stored there (see `public_config`)."""
    return flatten(public_config(cfg))


def overrides_tag(overrides: list[str]) -> str:
    """The command line's overrides as the `vaelab.overrides` tag records them: secrets as `***`."""
    return " ".join(map(redact_override, overrides))


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """{'objective': {'beta': 1.0}} -> {'objective.beta': '1.0'}: the composed config as MLflow params."""
    if isinstance(node, dict):
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: str(node)}


# What DVC writes, or removes before a stage runs, in a checkout: changes there say nothing about the code.
DVC_OWNED = ("metrics", "plots", "models", "data", "dvc.lock", "params.yaml")


def _git(*args: str, cwd: Path = Path(__file__).parent) -> str | None:
    """Ask git about the checkout the running vaelab code comes from (the code is what needs a commit)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def entry_point(checkout: str | None) -> str:
    """The script that started the process (`pipelines/train.py`), relative to the code's checkout when it lies
    inside it, as MLflow's own runs record it; `<console>` for an interactive session."""
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else None
    if script is None:
        return "<console>"
    if checkout:
        try:
            return Path(script).resolve().relative_to(Path(checkout).resolve()).as_posix()
        except ValueError:
            pass
    return script


def code_changes(cwd: Path = Path(__file__).parent) -> str | None:
    """git's list of the checkout's uncommitted changes to tracked files, besides DVC's outputs and its lock and
    params files (DVC removes a stage's outputs before running it, and `-S` rewrites params.yaml, whose values the
    run records as its params): empty for a clean checkout, None outside one."""
    excluded = [f":(top,exclude){path}" for path in DVC_OWNED]
    return _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded, cwd=cwd)


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment that runs this stage (`dvc exp run`), so that a run in MLflow leads back to its
    `dvc exp show` row: its name and the commit it is based on."""
    names = {"DVC_EXP_NAME": "dvc_experiment", "DVC_EXP_BASELINE_REV": "dvc_baseline_rev"}
    return {f"{TAG_PREFIX}{tag}": os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def lineage_tags(cfg: DictConfig, stage: str, overrides: list[str], extra: dict[str, str]) -> dict[str, str]:
    """Tags that let a person get from the run back to code, data and the command that made it: vaelab's own, and
    MLflow's standard `mlflow.source.*` ones, which fill the UI's Source column."""
    commit, _, checkout = (_git("rev-parse", "HEAD", "--show-toplevel") or "").partition("\n")
    dirty = code_changes()
    tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}git_commit": commit or "unknown",
        f"{TAG_PREFIX}git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        f"{TAG_PREFIX}overrides": overrides_tag(overrides),
        f"{TAG_PREFIX}command": shlex.join([Path(sys.executable).name, *map(redact_override, sys.argv)]),
        **{f"{TAG_PREFIX}{k}": v for k, v in extra.items()},
        **dvc_experiment_tags(),
        "mlflow.source.name": entry_point(checkout),
        "mlflow.source.type": "LOCAL",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def redacted(tags: dict[str, str]) -> dict[str, str]:
    """Tags as MLflow may store them: whatever text a tag holds (overrides, a command, an error), its secrets as
    `***` (vaelab.redaction)."""
    return {key: redact_text(value) for key, value in tags.items()}


def readable_name() -> str:
    """A name like `overjoyed-slug-911`, from MLflow's words, drawn afresh for each run.

    MLflow draws the name it gives an unnamed run from Python's global `random`, which vaelab seeds before the run
    exists: every run of one seed got the same name. This draw uses its own generator, seeded by the operating
    system, and leaves the global one (and so the training's random stream) untouched."""
    from mlflow.utils import name_utils

    draw = random.Random()
    adjective, noun = draw.choice(name_utils._GENERATOR_PREDICATES), draw.choice(name_utils._GENERATOR_NOUNS)
    return f"{adjective.lower()}-{noun.lower()}-{draw.randint(0, 999)}"


def run_name(cfg: DictConfig) -> str:
    """The run's name in the MLflow UI: `tracking.run_name` when set (a sweep's job and a search's trial set one
    from what they vary), else a readable one that tells the run from the others; its secrets as `***`."""
    given = cfg.tracking.get("run_name")
    return redact_text(str(given))[:MAX_RUN_NAME] if given else readable_name()


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
        info = run.client.create_run(experiment_id, run_name=run_name(cfg), tags=redacted(all_tags)).info
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

    def log_dataset(
        self,
        name: str,
        folder: Path,
        manifest: dict[str, Any],
        context: str,
        split: str | None = None,
        images: int | None = None,
    ) -> None:
        """The prepared dataset as the run's input: the MLflow UI's Dataset column, and a link between the runs that
        used the same data. Its digest is the start of the data hash; the input's tags hold the whole hash and
        where the raw data came from, and `context` says what the run used it for (`training`, `evaluation`).

        `split`: only that split (an evaluation's test images, the first `images` of them), as a dataset of its own,
        `<name>/<split>`, whose digest is the start of the split's content hash. MLflow keeps one input per dataset
        and run, so the training's input could not also say `evaluation`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        splits = {split: manifest["splits"][split]} if split else manifest["splits"]
        profile = {
            "image_shape": manifest["image_shape"],
            "grey_levels": manifest["grey_levels"],
            "images": {each: entry["count"] for each, entry in splits.items()},
        }
        if images is not None:
            profile["images_used"] = images
        digest = manifest["splits"][split]["sha256"] if split else manifest["data_hash"]
        dataset = Dataset(
            name=f"{name}/{split}" if split else name,
            digest=digest[:DIGEST_LENGTH],
            source_type="local",
            source=json.dumps({"uri": Path(folder).resolve().as_uri()}),
            profile=json.dumps(profile),
        )
        tags = redacted(
            {
                DATASET_CONTEXT_TAG: context,
                f"{TAG_PREFIX}data_hash": manifest["data_hash"],
                f"{TAG_PREFIX}data_source": str(manifest.get("source", "unknown")),
            }
        )
        inputs = [DatasetInput(dataset, [InputTag(key, value) for key, value in tags.items()])]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:  # one write, however many tags
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in redacted(tags).items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str, reason: str | None = None) -> None:
        """Mark the run FINISHED, FAILED or KILLED; a failure reason goes into the `vaelab.failure` tag."""
        if reason:
            self.client.set_tag(self.run_id, f"{TAG_PREFIX}failure", redact_text(reason)[:5000])
        with no_url_printed(self.uri):
            self.client.set_terminated(self.run_id, status)


@contextmanager
def no_url_printed(uri: str) -> Iterator[None]:
    """MLflow prints a server run's URL when the run ends: not when the URL holds a password."""
    if redact_url(uri) == uri:
        yield
        return
    before = os.environ.get(SUPPRESS_URL)
    os.environ[SUPPRESS_URL] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SUPPRESS_URL, None)
        else:
            os.environ[SUPPRESS_URL] = before
