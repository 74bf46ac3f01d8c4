"""Workers sharing one study: each claims trials until the study has exactly n_trials, a dead worker's trial
is retried, and all of them log under one MLflow parent run.

Several workers (processes running the same command) can share one study:
- Each claims its next trial under a file lock (beside a sqlite database), counting the trials every worker has
  started, so together they start exactly hydra.sweeper.n_trials. A lock file cannot reach workers on other machines:
  with a server database those may, starting a trial at the same instant, overshoot by one.
- A running trial records a heartbeat in the storage (`hydra.sweeper.heartbeat_interval`). Once it has been silent for
  `hydra.sweeper.grace_period` seconds its worker is taken for dead: the worker that notices marks the trial FAIL,
  closes its MLflow run FAILED with the reason in `vaelab.failure`, and Optuna's RetryHeartbeatStaleTrialCallback
  queues a retry with the same parameters (up to `hydra.sweeper.max_retry` times). A retry is an extra trial, with the
  system attribute `failed_trial` (`RetryHeartbeatStaleTrialCallback.retried_trial_number`), so it does not count
  towards hydra.sweeper.n_trials and retries are counted apart.
- A worker with nothing left to start stays until the trials other workers run have ended, so that it can retry
  one whose worker dies, and so that the study is complete when the last worker leaves.
- The workers of one session share one MLflow parent run, named in the study's user attribute
  `mlflow_parent_run_id`: the first creates it, the others join it while it is RUNNING (its tag `vaelab.workers`
  counts them), and the last to finish writes the report into it and ends it. A later rerun, after the parent has
  ended, gets a parent of its own. A parent left RUNNING by a worker that was killed is joined and ended by the
  next one, which also closes any child run that a dead worker left RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from vaelab.search.config import Settings
from vaelab.search.objective import Objective
from vaelab.search.report import Progress, SearchResult, write_report
from vaelab.search.space import Param
from vaelab.search.study import (
    RETRY_ATTR,
    WORKER_ATTR,
    StaleTrials,
    Tally,
    close_dead_run,
    display_url,
    fail_stale_trials,
    open_study,
    study_lock,
    study_trial,
)
from vaelab.tracking.lifecycle import end_run, stop_signal
from vaelab.tracking.run import Run
from vaelab.tracking.store import resolve_uri

if TYPE_CHECKING:
    import optuna
    from filelock import FileLock

WAIT_POLL_S = 2.0  # how often a worker with nothing left to start looks at the other workers' trials
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow parent run of the workers now running it


# Optuna's logging


def quiet_once_stopped(record: logging.LogRecord) -> bool:
    """Optuna's warnings about a trial that Ctrl-C or SIGTERM stopped (a traceback of the interrupt) go unprinted:
    the search says in one line that it was interrupted and how to resume."""
    return stop_signal() is None


def quiet_optuna() -> None:
    """Optuna's INFO line per trial goes (Progress prints one of its own), and so do its warnings about a trial
    that Ctrl-C or SIGTERM stopped."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if quiet_once_stopped not in optimize_log.filters:
        optimize_log.addFilter(quiet_once_stopped)


# Claiming trials until the study has hydra.sweeper.n_trials


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Claimed:
    """The objective, for a trial this worker has just claimed under the study lock: the trial is marked as this
    worker's (so that the others wait for it), and the lock is handed back before the trial trains."""

    objective: Objective
    lock: FileLock

    def __call__(self, trial: optuna.Trial) -> float:
        from optuna.trial import TrialState

        try:
            trial.set_user_attr(WORKER_ATTR, worker_id())
            # A retry starts with the dead trial's user attributes; Optuna 5's Trial hides the system attributes
            # that say so, its stored copy does not.
            stored = study_trial(trial.study, trial.number, TrialState.RUNNING)
            history = stored.system_attrs.get("retry_history", [])
            if history:
                trial.set_user_attr(RETRY_ATTR, history[-1])
                trial.set_user_attr("mlflow_run_id", None)  # the dead trial's; this one gets its own run
        finally:
            self.lock.release()
        return self.objective(trial)


def run_trials(
    study: optuna.Study, objective: Objective, settings: Settings, lock: FileLock, parent: SharedParent | None
) -> None:
    """Run trials until the study has hydra.sweeper.n_trials of its own, no queued retries, and no trial running in
    another worker. Each step is decided, and its trial claimed, under the study lock, so two workers never both
    take the last trial or the same queued retry; the trial hands the lock back once it exists (`Claimed`)."""
    progress = Progress(settings)
    waiting_for: tuple[int, ...] = ()
    while True:
        lock.acquire()
        try:
            fail_stale_trials(study)
            tally = Tally.of(study)
            step = tally.next_step(settings.n_trials)
            if step == "run":
                if parent:
                    parent.reopen_if_ended()
                study.optimize(
                    Claimed(objective, lock),
                    n_trials=1,
                    catch=(Exception,),  # a failed trial (an exception, a NaN) is FAIL and the study goes on
                    callbacks=[progress],
                    gc_after_trial=True,
                )
        finally:
            if lock.is_locked:  # the trial never started
                lock.release()
        if step == "done":
            return
        if step == "wait":
            if tally.running != waiting_for:
                waiting_for = tally.running
                print(
                    f"search: nothing left to start; waiting for trial(s) {', '.join(map(str, waiting_for))} of other "
                    f"workers (a trial silent for {settings.grace_period} s is retried here)",
                    flush=True,
                )
            time.sleep(min(WAIT_POLL_S, settings.heartbeat_interval))


# A worker that a launcher starts


@dataclass(frozen=True)
class TrialWorker:
    """The task an out-of-process launcher (joblib, slurm) runs in each of a search's workers, in place of the
    application's: open the study, then run trials until it has n_trials, under the sweeper's parent run. Plain
    data, so that the launcher can ship it to another process or machine."""

    settings: Settings
    config_name: str
    train: list[str]
    params: list[Param]
    max_epochs: int | str
    fixed: dict[str, str]
    tracking_uri: str | None
    parent_run_id: str | None
    experiment: str | None

    def __call__(self, cfg: DictConfig) -> None:

        from vaelab.logs import quiet_third_party
        from vaelab.tracking.lifecycle import stop_on_signals

        stop_on_signals()  # SIGTERM fails this worker's trial and ends its run KILLED, as Ctrl-C does
        quiet_third_party()
        quiet_optuna()
        lock = study_lock(self.settings)
        stale = StaleTrials(self.settings, self.tracking_uri)
        study = open_study(self.settings, self.max_epochs, lock, stale, self.fixed)
        parent = None
        if self.parent_run_id and self.tracking_uri:
            parent = SharedParent(Run(self.tracking_uri, self.parent_run_id, self.experiment or ""), lock)
        objective = Objective(None, self.config_name, self.train, self.params, self.settings, self.parent_run_id)
        run_trials(study, objective, self.settings, lock, parent)


# The parent run the workers share


def running_parent(study: optuna.Study, tracking_uri: str) -> Run | None:
    """The study's parent run (its user attribute), if it is in this tracking store and still RUNNING."""
    from mlflow.exceptions import MlflowException

    run_id = study.user_attrs.get(PARENT_ATTR)
    if not run_id:
        return None
    run = Run(tracking_uri, run_id, experiment="")
    try:
        info = run.client.get_run(run_id).info
    except MlflowException:  # a parent in another tracking store
        return None
    if info.status != "RUNNING":
        return None
    run.experiment = run.client.get_experiment(info.experiment_id).name
    return run


def close_dead_children(parent: Run, reason: str) -> list[str]:
    """Close the child runs of `parent` still RUNNING when no trial is: their workers died, some before the run was
    linked to its trial (so StaleTrials could not find it). Returns their ids."""
    experiment = parent.client.get_run(parent.run_id).info.experiment_id
    found = parent.client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'"
    )
    for run in found:
        close_dead_run(parent.uri, run.info.run_id, reason)
    return [run.info.run_id for run in found]


@dataclass
class SharedParent:
    """The MLflow parent run of the workers that run a study at the same time (see the module's docstring): one
    per session, so that the MLflow UI shows one search with all its trials, whichever worker ran them."""

    run: Run
    lock: FileLock

    @classmethod
    def join(
        cls, study: optuna.Study, base: DictConfig, settings: Settings, argv: Sequence[str], lock: FileLock
    ) -> SharedParent:
        """Join the study's parent run while it is RUNNING; else create one and name it in the study."""

        with lock:
            run = running_parent(study, resolve_uri(base.tracking.uri))
            if run is not None:
                workers = int(run.client.get_run(run.run_id).data.tags.get("vaelab.workers", "1")) + 1
                run.set_tags({"vaelab.workers": str(workers)})
                print(f"search: joining MLflow parent run {run.run_id} (its worker {workers})", flush=True)
                return cls(run, lock)
            named = base.copy()
            named.tracking.run_name = base.tracking.run_name or f"{settings.study_name}/search"
            run = Run.create(
                named,
                stage="search",
                overrides=list(argv),
                tags={"kind": "search", "search": settings.name},
                log_params=False,
            )
            run.set_tags(
                {
                    "optuna.study_name": settings.study_name,
                    "optuna.storage": display_url(settings.storage),
                    "optuna.metric": settings.metric,
                    "optuna.direction": settings.direction,
                    "optuna.sampler": settings.sampler_name,
                    "optuna.pruner": settings.pruner_name,
                    "vaelab.search_space": "\n".join(f"{k}: {v}" for k, v in settings.space.items())[:5000],
                    "vaelab.workers": "1",
                }
            )
            study.set_user_attr(PARENT_ATTR, run.run_id)
            return cls(run, lock)

    def status(self) -> str:
        return self.run.client.get_run(self.run.run_id).info.status

    def reopen_if_ended(self) -> None:
        """Before a trial starts (under the lock): a worker with a smaller n_trials, or one that stopped on
        an error, may have ended the parent meanwhile. Its trials still belong under it."""
        if self.status() != "RUNNING":
            Run.reopen(self.run.uri, self.run.run_id)

    def finish(self, study: optuna.Study, settings: Settings, config_dir: Path) -> SearchResult:
        """The last worker out writes the report and ends the parent: FINISHED, or FAILED when no trial completed; the
        others only report."""
        with self.lock:
            fail_stale_trials(study)
            if Tally.of(study).running or self.status() == "FINISHED":  # not the last, or the last already did it
                result = write_report(study, settings, config_dir, parent=None)
                result.parent_run_id = self.run.run_id
                return result
            self.reopen_if_ended()
            closed = close_dead_children(self.run, "its worker died; no trial of the study runs any more")
            if closed:
                print(f"search: closed {len(closed)} MLflow run(s) left RUNNING by dead workers: {closed}")
            result = write_report(study, settings, config_dir, self.run)
            # A search whose trials all failed found nothing: its parent says so, FAILED, as a sweep's does.
            failure = result.failure() if result.completed_none else None
            end_run(self.run, RuntimeError(failure) if failure else None, reason=failure)
            return result

    def abandon(self, study: optuna.Study, error: BaseException) -> None:
        """This worker stops on an error or Ctrl-C: it ends the parent KILLED or FAILED, unless other workers still
        run trials under it (the last of them ends it)."""
        with self.lock:
            try:
                fail_stale_trials(study)
                busy = Tally.of(study).running
            except Exception:  # the storage itself may be what failed
                busy = ()
            if busy:
                print("search: this worker stops; the MLflow parent run stays open for the workers still running")
                return
            end_run(self.run, error)
