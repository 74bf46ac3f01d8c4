"""One job of a multirun sweep: trained as a nested child run of the sweep's parent, its failure recorded and
contained (see vaelab.sweep.runs for how the sweep's pieces meet)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab import paths
from vaelab.files import write_text_atomic
from vaelab.redaction import redact_config, redact_override
from vaelab.sweep.runs import (
    METRICS,
    child_metric,
    find_child,
    job_tags,
    parent_run_id,
    short_error,
    split_override,
)
from vaelab.tracking.lifecycle import stop_on_signals
from vaelab.tracking.run import TAG_PREFIX, overrides_tag

MULTIRUN_CONFIG = "multirun.yaml"  # Hydra's name


def run_job(cfg: DictConfig) -> float:
    """Train one multirun job as a nested child run; return its val/elbo, or NaN when it failed.

    A failure never propagates: the job's child run is FAILED with the reason in `vaelab.failure`, one plain line
    goes to stderr, and the sweep goes on. A config error, which train() raises before any run exists, still gets
    a FAILED child run (with the job's params), so the summary lists every job.
    """
    from vaelab.config import validate
    from vaelab.stages.resume import best_epoch_text
    from vaelab.tracking.run import Run
    from vaelab.tracking.store import resolve_uri

    stop_on_signals()  # a parallel launcher's worker process too: SIGTERM ends its job's run KILLED
    hydra = HydraConfig.get()
    num, overrides = hydra.job.num, list(hydra.overrides.task)
    redact_sweep_config(Path(hydra.sweep.dir))
    parent = parent_run_id(hydra.sweep.dir)
    label = f"job {num} [{overrides_tag(overrides)}]"
    started_ms = int(time.time() * 1000)
    name_after_overrides(cfg, num, overrides, swept_keys(Path(hydra.sweep.dir)))
    try:
        validate(cfg)
        from vaelab.stages.train import train

        # Tagged as it is created, so that a job stopped halfway is still known as this job in the summary.
        tags = {key.removeprefix(TAG_PREFIX): value for key, value in job_tags(num, overrides).items()}
        summary = train(cfg, parent_run_id=parent, tags=tags)
    except Exception as error:
        run_id = record_failure(cfg, parent, num, overrides, error, started_ms)
        point_to(run_id, hydra.runtime.output_dir)
        print(f"vaelab: {label} FAILED: {short_error(error)} (run {run_id})", file=sys.stderr, flush=True)
        return math.nan
    point_to(str(summary["run_id"]), hydra.runtime.output_dir)
    run = Run(resolve_uri(cfg.tracking.uri), str(summary["run_id"]), cfg.tracking.experiment)
    run.log_metrics({child_metric(k): float(summary[k]) for k in METRICS})
    tested = f", test/nll_iw {summary['test/nll_iw']:.2f}" if "test/nll_iw" in summary else ""  # eval.after_train
    print(
        f"vaelab: {label} finished: val/elbo {summary['val/elbo']:.2f}, val/nll_iw {summary['val/nll_iw']:.2f} "
        f"({best_epoch_text(summary)}){tested}, run {summary['run_id']}",
        flush=True,
    )
    return float(summary["val/elbo"])


def name_after_overrides(cfg: DictConfig, num: int, overrides: list[str], swept: set[str] | None = None) -> None:
    """The job's run is named by what the job sets, Hydra's way (`objective.beta=4,model.latent_dim=8`), so the
    MLflow UI tells a sweep's children apart: the overrides of the `swept` keys when known (those set alike for
    every job would fill the column first), else all of them. `tracking.run_name`, when set, names them all."""
    if cfg.tracking.get("run_name") is not None:
        return
    named = [o for o in overrides if swept and split_override(o)[0] in swept] or overrides
    with read_write(cfg), open_dict(cfg):
        cfg.tracking.run_name = ",".join(map(redact_override, named)) or f"job {num}"


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys the sweep varies: its sweep overrides (`objective.beta=1,4`, as Hydra saved the command line in
    multirun.yaml) and its `hydra.sweeper.params`; None when multirun.yaml cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        saved = OmegaConf.load(sweep_dir / MULTIRUN_CONFIG)
        launched = OverridesParser.create().parse_overrides(list(saved.hydra.overrides.task))
        params = saved.hydra.sweeper.get("params") or {}
    except Exception:  # noqa: BLE001 - a name is no reason to fail a job: it falls back to every override
        return None
    return {o.key_or_group for o in launched if o.is_sweep_override()} | {str(key).lstrip("+~") for key in params}


def point_to(run_id: str | None, job_dir: str) -> None:
    """Hydra's folder for the job holds just its run id: its files are in outputs/<run_id>/."""
    if run_id:
        write_text_atomic(Path(job_dir) / paths.RUN_ID_FILE, run_id + "\n")


def record_failure(
    cfg: DictConfig, parent: str, num: int, overrides: list[str], error: Exception, started_ms: int
) -> str | None:
    """The id of the job's FAILED child run: train() made and ended it if the failure came after the run started;
    otherwise (an invalid config or missing data) it is made here. None if even MLflow failed."""
    from vaelab.tracking.lifecycle import end_run
    from vaelab.tracking.run import Run
    from vaelab.tracking.store import resolve_uri

    try:
        uri = resolve_uri(cfg.tracking.uri)
        found = find_child(uri, parent, overrides_tag(overrides), started_ms)
        if found:
            run = Run(uri, found, cfg.tracking.experiment)
        else:
            run = Run.create(cfg, "train", overrides, tags={}, parent_run_id=parent, log_params=resolvable(cfg))
            end_run(run, error, reason=short_error(error))
        run.set_tags(job_tags(num, overrides))
        return run.run_id
    except Exception as tracking_error:  # the store itself is the problem: the job still only fails
        print(f"vaelab: could not record the failed job in MLflow: {short_error(tracking_error)}", file=sys.stderr)
        return None


_redacted: set[Path] = set()  # the sweep folders this process has already redacted


def redact_sweep_config(folder: Path) -> None:
    """Hydra saves the sweep's config, with the command line's overrides, as multirun.yaml in the sweep folder
    before any job starts: the first job of each process rewrites it without its secrets (vaelab.redaction), the
    same for every job, and the others need not read it again."""
    saved = folder / MULTIRUN_CONFIG
    if folder in _redacted or not saved.is_file():
        return
    _redacted.add(folder)
    config = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    public = redact_config(config)
    if public != config:
        write_text_atomic(saved, OmegaConf.to_yaml(public))


def resolvable(cfg: DictConfig) -> bool:
    """Can the config be flattened into params? (A broken interpolation cannot; then the run goes without.)"""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return False
    return True
