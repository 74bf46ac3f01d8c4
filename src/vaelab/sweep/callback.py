"""The Hydra callback that frames a multirun sweep: the parent MLflow run before the first job, the summary after the
last (see vaelab.sweep.runs for how the sweep's pieces meet).

Hydra instantiates this callback for every run, multirun or not, so importing it stays light: a single run's config
typo still fails in a second.
"""

from __future__ import annotations

import atexit
import copy
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab import paths
from vaelab.files import write_text_atomic
from vaelab.sweep.runs import OPTUNA_SWEEPER, PARENT_ENV, PARENT_FILE, short_error
from vaelab.tracking.lifecycle import INTERRUPTED, end_run, stop_signal

if TYPE_CHECKING:
    from vaelab.sweep.summary import Summary
    from vaelab.tracking.run import Run


class SweepCallback(Callback):
    """Hydra callback: the parent run of a multirun, and its summary when the last job has ended."""

    def __init__(self) -> None:
        self.parent: Run | None = None
        self.config: DictConfig | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Hydra ships its callbacks to joblib's workers; they need none of this state
        return {"parent": None, "config": None}

    # Hydra turns an exception in a callback into a warning and carries on, so these methods exit themselves.

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") == OPTUNA_SWEEPER:
            return  # a search: its sweeper owns the parent run, shared by every worker of the study
        if config.get("logger") is None:
            stop("a sweep tracks its jobs in MLflow: logger=none cannot be used with -m", status=2)
        try:
            self.start(config)
        except Exception as error:  # e.g. an unusable tracking.uri: one plain message before any job starts
            stop(f"cannot start the sweep: {short_error(error)}", status=2)

    def start(self, config: DictConfig) -> None:
        from vaelab.config import problems
        from vaelab.errors import ConfigError
        from vaelab.tracking.run import Run

        # Only the tracking keys, which the parent run needs: the other keys are each job's to check, since the
        # config before the swept values are filled in need not be valid on its own.
        tracking = [problem for problem in problems(config) if problem[0].startswith("tracking.")]
        if tracking:
            raise ConfigError(tracking)
        name = sweep_name(config)
        params = dict(config.hydra.sweeper.get("params") or {})
        overrides = list(config.hydra.overrides.task)
        tags = {
            "kind": "sweep",
            "sweep": name or "",
            "sweep_params": " ".join(f"{k}={v}" for k, v in params.items()),
            "sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
            "launcher": str(config.hydra.runtime.choices.get("hydra/launcher")),
        }
        self.config = config
        check_jobs_compose(config)
        self.parent = Run.create(parent_config(config, name), "sweep", overrides, tags, log_params=False)
        os.environ[PARENT_ENV] = self.parent.run_id  # before the launcher starts any worker process
        write_text_atomic(Path(config.hydra.sweep.dir) / PARENT_FILE, self.parent.run_id + "\n")
        atexit.register(self.end_abandoned)
        folder = paths.run_dir(self.parent.run_id)
        title = f"sweep {name}" if name else "sweep"
        print(f"vaelab: {title}: parent MLflow run {self.parent.run_id}, summary in {folder}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        parent = self.parent  # held until it has ended: an interrupt during the summary still ends it (end_abandoned)
        try:
            summary = self.summarize(config, parent)
        except Exception as error:
            self.parent = None
            end_run(parent, error, reason=f"the sweep's summary failed: {short_error(error)}")
            stop(f"the sweep's jobs ended, but its summary failed: {short_error(error)}", status=1)
        self.parent = None
        print(summary.console(), flush=True)
        if summary.failed:
            failed = ", ".join(str(row["job"]) for row in summary.failed)
            stop(
                f"{len(summary.failed)} of {len(summary.rows)} sweep jobs failed (job {failed}); "
                f"see {summary.folder / 'summary.md'}",
                status=1,
            )

    @staticmethod
    def summarize(config: DictConfig, parent: Run, stopped: BaseException | None = None) -> Summary:
        """The summary of every job Hydra launched (or, when `stopped`, was to launch), written and logged to the
        parent, which it ends."""
        from vaelab.sweep.runs import job_pointers, launched_jobs
        from vaelab.sweep.summary import summarize

        launched = launched_jobs(config.hydra.sweeper, list(config.hydra.overrides.task))
        pointers = job_pointers(config.hydra.sweep.dir)
        return summarize(parent, paths.run_dir(parent.run_id), launched, pointers, stopped=stopped)

    def end_abandoned(self) -> None:
        """At exit, a parent that never reached the end of on_multirun_end: Ctrl-C or SIGTERM stopped the sweep (the
        parent ends KILLED with the summary of the jobs that ran and a list of those that did not), or Hydra did
        (FAILED)."""
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        signal_name = stop_signal()
        if signal_name is None:
            end_run(parent, RuntimeError(), reason="the sweep stopped before all its jobs ended")
            return
        try:
            summary = self.summarize(self.config, parent, stopped=KeyboardInterrupt())
        except Exception as error:  # the store itself may be what failed; the parent still ends
            end_run(parent, KeyboardInterrupt(), reason=f"{INTERRUPTED}; its summary failed: {short_error(error)}")
            return
        print(summary.console(), flush=True)
        not_run = "; ".join(f"job {row['job']} [{swept_values(row, summary.axes)}]" for row in summary.not_run)
        print(
            f"vaelab: the sweep was stopped by {signal_name}: {summary.counts()}"
            + (f"; not run: {not_run}" if not_run else "")
            + f"; see {summary.folder / 'summary.md'}",
            file=sys.stderr,
            flush=True,
        )


def check_jobs_compose(config: DictConfig) -> None:
    """Every swept value composes (its group option exists, its key is known) before the parent run exists: a typo
    then stops the sweep in one line, instead of after the parent, or even some of the jobs, ran. Each distinct
    override is composed once, beside the first job's others, rather than every job: sum, not product, of the axes.
    Another value of a key that is not a config group composes exactly when the first job's value does, so only the
    first job's composition checks it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from vaelab.config import hydra_errors
    from vaelab.sweep.runs import launched_jobs

    jobs = launched_jobs(config.hydra.sweeper, list(config.hydra.overrides.task))
    if not jobs:
        return
    first = {override.partition("=")[0]: override for override in jobs[0]}
    loader = GlobalHydra.instance().config_loader()
    variants = [list(first.values())]
    for override in dict.fromkeys(o for job in jobs[1:] for o in job):
        key = override.partition("=")[0]
        if override in first.values() or (key in first and not loader.get_group_options(key.lstrip("+~"))):
            continue
        variants.append(list({**first, key: override}.values()))
    launcher = config.hydra.runtime.choices.get("hydra/launcher")
    for overrides in variants:
        with hydra_errors():
            job = compose(config_name=config.hydra.job.config_name, overrides=overrides)
        check_ranks_not_spawned(job, launcher)


# The launcher whose jobs get their ranks from outside (srun's tasks): Lightning then starts no process itself.
RANKS_FROM_THE_LAUNCHER = ("slurm",)


def check_ranks_not_spawned(job: DictConfig, launcher: str | None) -> None:
    """A DDP job of a sweep that Lightning would have to start its ranks for: Lightning starts each further rank
    with the command line it was given, which here is the whole sweep, so every rank would run every job again."""
    from vaelab.config import is_ddp
    from vaelab.errors import ConfigError

    strategy = OmegaConf.select(job, "trainer.strategy")
    if is_ddp(strategy) and launcher not in RANKS_FROM_THE_LAUNCHER:
        allowed = (
            f"no DDP strategy in a -m sweep on hydra/launcher={launcher}: Lightning would start each further rank "
            "with the whole sweep's command line, and every rank would run every job. Train one job per GPU, or "
            "use hydra/launcher=slurm with hydra.launcher.tasks_per_node equal to trainer.devices"
        )
        raise ConfigError([("trainer.strategy", strategy, allowed)])


def swept_values(row: dict[str, Any], axes: list[str]) -> str:
    """`objective.beta=4`: a job's values of the swept keys (all its overrides when nothing varies)."""
    return " ".join(f"{key}={value}" for key, value in row["overrides"].items() if key in axes or not axes)


def stop(message: str, status: int) -> NoReturn:
    print(f"vaelab: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def sweep_name(config: DictConfig) -> str | None:
    choice = config.hydra.runtime.choices.get("sweep")
    return None if choice in (None, "null") else str(choice)


def parent_config(config: DictConfig, name: str | None) -> DictConfig:
    """The launching config with a readable parent run name, unless tracking.run_name sets one."""
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        cfg.tracking.run_name = cfg.tracking.run_name or " ".join(filter(None, ["sweep", name]))
    return cfg
