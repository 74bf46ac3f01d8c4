"""The Optuna study in its persistent storage: created on first use, then loaded with this process's sampler and
pruner and with heartbeats; the file lock that makes its bookkeeping one worker at a time; where it stands (Tally);
and what becomes of a trial whose worker died (StaleTrials: FAIL, a retry with the same parameters, its MLflow run
closed FAILED). How the workers use all this: vaelab.search.workers."""

from __future__ import annotations

import re
import sqlite3
import warnings
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaelab import paths
from vaelab.errors import ConfigError, VaelabError
from vaelab.redaction import redact_override
from vaelab.search.config import Settings, key

if TYPE_CHECKING:
    import optuna
    from filelock import FileLock

STORAGE_TIMEOUT_S = 60  # sqlite: how long a writer waits for another process's lock
WORKER_ATTR = "worker"  # trial user attribute: the host:pid running it
RETRY_ATTR = "retry_of"  # trial user attribute of a retry: the trial whose dead worker it replaces
OPENED_ATTR = "processes_opened"  # study user attribute: how many processes have opened it (for the sampler seed)
FIXED_ATTR = "fixed_settings"  # study user attribute: the overrides every trial of it trained with, besides the space
# Where a run is logged, shown or placed changes nothing it learns: a study's later workers may change these.
NOT_SETTINGS = (
    "tracking.",
    "logger",
    "callbacks",
    "hydra.",
    "hydra/",
    "hparams_search",
    "trainer.accelerator",
    "trainer.devices",
)


# The storage


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def check_storage_is_optunas(settings: Settings) -> None:
    """Refuse, before anything is written into it (or beside it), a storage database that holds tables outside
    Optuna's own schema: another tool's database (mlflow.db, say) would get Optuna's tables written into it, and then
    an error about upgrading Optuna. A new or empty database is fine: Optuna creates its schema there."""
    from optuna.storages._rdb.models import BaseModel

    db = _sqlite_path(settings.storage)
    try:
        tables = _sqlite_tables(db) if db else _server_tables(settings.storage)
    except sqlite3.DatabaseError as error:
        allowed = f"an SQLite database of Optuna's own, or a new file ({db} is not a database: {error})"
        raise ConfigError([(key("storage"), display_url(settings.storage), allowed)]) from None
    optunas = set(BaseModel.metadata.tables) | {"alembic_version"}  # alembic_version: its schema's version
    foreign = sorted(name for name in tables if name not in optunas and not name.startswith("sqlite_"))
    if foreign:
        where = str(db) if db else "the database"
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        allowed = (
            f"a database of Optuna's own, or a new one: {where} holds other tables ({shown}), another tool's data "
            "that the study must not write into"
        )
        raise ConfigError([(key("storage"), display_url(settings.storage), allowed)])


def _sqlite_tables(db: Path) -> list[str]:
    """The tables of an existing SQLite file, read without writing (no file, or an empty one: none)."""
    if not db.is_file() or db.stat().st_size == 0:
        return []
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        return [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def _server_tables(url: str) -> list[str]:
    """The tables of a server database; none when it cannot be reached yet (Optuna then says why)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).get_table_names()
    except sqlalchemy.exc.OperationalError:
        return []
    finally:
        engine.dispose()


def display_url(url: str) -> str:
    """The storage URL without its password, for logs and tags."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def safe_file_name(name: str) -> str:
    """`name` with what a file name should not hold replaced by `_`: the study's name in its lock and best_<study>."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# Opening the study: its sampler, pruner and lock


def build_sampler(settings: Settings, offset: int) -> optuna.samplers.BaseSampler:
    """The configured sampler. A seeded sampler restarts its random stream in every process, so a resumed study
    would repeat its first trials' parameters, and two workers started together would draw the same ones: the seed
    is offset by the number of trials already in the study plus the number of processes that opened it before."""
    import optuna

    spec = dict(settings.sampler)
    seed = spec.get("seed")
    if isinstance(seed, int) and 0 <= seed < 2**32:  # a seed out of range is left for Optuna to refuse
        spec["seed"] = (seed + offset) % 2**32  # numpy's seeds are below 2**32
    return build_optuna_part(spec, optuna.samplers.BaseSampler, "sampler")


def build_pruner(settings: Settings, max_epochs: int | str) -> optuna.pruners.BasePruner:
    """The configured pruner; its steps are epochs (0-based), hyperband's resource runs up to max_epochs unless
    its max_resource says otherwise."""
    import optuna

    spec = dict(settings.pruner)
    if settings.pruner_name == "HyperbandPruner" and spec.get("max_resource") is None:
        spec["max_resource"] = max_epochs
    return build_optuna_part(spec, optuna.pruners.BasePruner, "pruner")


def build_optuna_part(spec: dict[str, Any], kind: type, name: str) -> Any:
    """`spec` ({_target_: class, arguments}) built, once its class is known to be a `kind`: a config names classes
    to build, and only Optuna's samplers or pruners are built here. Anything wrong is a ConfigError naming
    hydra.sweeper.<name>."""
    from importlib import import_module

    target = spec.pop("_target_", None)
    module, _, attribute = str(target).rpartition(".")
    try:
        found = getattr(import_module(module), attribute, None)
    except (ImportError, ValueError):
        found = None
    if not (isinstance(found, type) and issubclass(found, kind)):
        allowed = f"an Optuna {name} class, such as {kind.__module__.rsplit('.', 1)[0]}.<{kind.__name__[4:]}>"
        raise ConfigError([(key(f"{name}._target_"), target, allowed)])
    try:
        return found(**spec)
    except (TypeError, ValueError) as error:
        raise ConfigError([(key(name), f"{target}({spec})", f"arguments {found.__name__} takes: {error}")]) from None


def study_lock(settings: Settings) -> FileLock:
    """The lock that makes a study's bookkeeping one worker at a time: creating the study, claiming a trial, failing
    and retrying a dead worker's trial, joining and ending the parent run. Two processes creating one sqlite study at
    once can fail with an IntegrityError, and sqlite ignores the row lock (SELECT ... FOR UPDATE) with which Optuna
    hands a queued trial to one worker only. Beside a sqlite database (optuna.db.lock); for a server database, in
    the project's store root, where it serializes this machine's workers only."""
    from filelock import FileLock

    db = _sqlite_path(settings.storage)
    path = Path(f"{db}.lock") if db else paths.store_root() / f".optuna-{safe_file_name(settings.study_name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def fixed_settings(overrides: Sequence[str]) -> dict[str, str]:
    """The training overrides that make a study's experiment (`trainer.max_epochs=2`, `data=digits`), as
    {key: value}, secrets as `***`: every override but those of NOT_SETTINGS."""
    fixed = {}
    for override in overrides:
        key, _, value = redact_override(override).partition("=")
        if not key.lstrip("+~").startswith(NOT_SETTINGS):
            fixed[key] = value
    return fixed


def open_study(
    settings: Settings,
    max_epochs: int | str,
    lock: FileLock,
    on_stale: StaleTrials,
    fixed: dict[str, str] | None = None,
) -> optuna.Study:
    """Create the study on first use, then load it with this process's sampler and pruner, and with heartbeats:
    `on_stale` is called for a trial whose worker died. `fixed`: the training overrides besides the space
    (fixed_settings), recorded by the study's first process and refused by any later one that differs."""
    import optuna

    db = _sqlite_path(settings.storage)
    with lock:
        engine = {"connect_args": {"timeout": STORAGE_TIMEOUT_S}} if db else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            storage = optuna.storages.RDBStorage(
                settings.storage,
                engine_kwargs=engine,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                heartbeat_stale_trial_callback=on_stale,
            )
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, direction=settings.direction, load_if_exists=True
        )
        if "metric" not in study.user_attrs:
            study.set_user_attr("metric", settings.metric)
            study.set_user_attr("search", settings.name)
            study.set_user_attr("space", settings.space)
        if FIXED_ATTR not in study.user_attrs:  # also a study from before studies kept them: from now on
            study.set_user_attr(FIXED_ATTR, fixed or {})
        opened_before = study.user_attrs.get(OPENED_ATTR, 0)
        study.set_user_attr(OPENED_ATTR, opened_before + 1)
        seed_offset = len(study.trials) + opened_before
    check_study_matches(study, settings)
    check_same_settings(study, settings, fixed or {})
    if study.user_attrs.get("space") != settings.space:
        print(f"search: note: study '{settings.study_name}' was started with another search space; trials differ")
    return optuna.load_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=build_sampler(settings, seed_offset),
        pruner=build_pruner(settings, max_epochs),
    )


def check_study_matches(study: optuna.Study, settings: Settings) -> None:
    """A study keeps its direction and metric: values of different metrics cannot be ranked together."""
    direction = study.direction.name.lower()
    if direction != settings.direction:
        allowed = (
            f"{direction}, the direction of the existing study '{settings.study_name}' (or a new {key('study_name')})"
        )
        raise ConfigError([(key("direction"), settings.direction, allowed)])
    metric = study.user_attrs.get("metric", settings.metric)
    if metric != settings.metric:
        allowed = f"{metric}, the metric of the existing study '{settings.study_name}' (or a new {key('study_name')})"
        raise ConfigError([(key("metric"), settings.metric, allowed)])


def check_same_settings(study: optuna.Study, settings: Settings, fixed: dict[str, str]) -> None:
    """A study is one experiment: trials trained with other fixed settings (other epochs, other data) would be ranked
    against its own as if they were comparable. So a process with other settings than the study's first is refused,
    naming each key that differs."""
    recorded = study.user_attrs.get(FIXED_ATTR, {})
    differing = sorted(key for key in recorded.keys() | fixed.keys() if recorded.get(key) != fixed.get(key))
    if not differing:
        return
    absent = "(not set)"
    changes = "; ".join(
        f"{key}: {recorded.get(key, absent)} in the study, {fixed.get(key, absent)} here" for key in differing
    )
    raise VaelabError(
        f"{key('study_name')}={settings.study_name!r}: that study was run with other settings ({changes}). Trials of "
        "different settings cannot be ranked together: repeat the study's settings to add trials to it, or name a "
        f"new study with {key('study_name')}=<name>"
    )


# Its trials


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the trials whose worker died (silent for hydra.sweeper.grace_period), calling StaleTrials for each.
    Call it under the study lock: sqlite would let two workers both fail, and both retry, one trial."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the first trial of the series this trial retries, or None for a trial of its own: what
    RetryHeartbeatStaleTrialCallback.retried_trial_number reads, without its "experimental" warning per call."""
    return trial.system_attrs.get("failed_trial")


def study_trial(study: optuna.Study, number: int, state: optuna.trial.TrialState) -> optuna.trial.FrozenTrial:
    return next(trial for trial in study.get_trials(deepcopy=False, states=(state,)) if trial.number == number)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


@dataclass(frozen=True)
class Tally:
    """Where a study stands: what a worker decides its next step by (under the study lock) and what it reports."""

    trials: int  # the study's own trials in any state, retries not included: what hydra.sweeper.n_trials counts
    done: int  # of those, the ones that have ended (COMPLETE, PRUNED or FAIL)
    finished: int  # all trials that have ended, retries included
    retries: int  # retries of trials whose worker died, in any state
    queued: int  # trials no worker has started yet (WAITING): retries, or trials enqueued by hand
    running: tuple[int, ...]  # the trials vaelab workers are running now

    @classmethod
    def of(cls, study: optuna.Study) -> Tally:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        own = [trial for trial in trials if retry_of(trial) is None]
        return cls(
            trials=len(own),
            done=sum(trial.state.is_finished() for trial in own),
            finished=sum(trial.state.is_finished() for trial in trials),
            retries=len(trials) - len(own),
            queued=sum(trial.state == TrialState.WAITING for trial in trials),
            running=tuple(
                trial.number
                for trial in trials
                if trial.state == TrialState.RUNNING and WORKER_ATTR in trial.user_attrs
            ),
        )

    def next_step(self, n_trials: int) -> str:
        """run (a queued trial, or a new one), wait (for other workers' trials, which may need a retry), done."""
        if self.queued or self.trials < n_trials:
            return "run"
        return "wait" if self.running else "done"

    def describe(self, n_trials: int) -> str:
        todo = []
        if self.trials < n_trials:
            todo.append(f"running {n_trials - self.trials} more")
        if self.queued:
            todo.append(f"{self.queued} queued (retries of trials whose worker died)")
        running = f" and {len(self.running)} running elsewhere" if self.running else ""
        todo_text = ", ".join(todo) or "nothing to run"
        return f"{self.finished} finished trials{running}, n_trials={n_trials}: {todo_text}"


# A trial whose worker died


@dataclass
class StaleTrials:
    """Optuna's heartbeat-stale callback, called by whichever worker notices that a trial's worker died (the trial
    is FAIL by then): queue a retry with the same parameters, and close the dead worker's MLflow run, which it left
    RUNNING, as FAILED with the reason in `vaelab.failure`."""

    settings: Settings
    tracking_uri: str | None  # None: the search logs nothing to MLflow

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.settings.max_retry)(study, trial)
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        retry = next((t.number for t in queued if t.system_attrs.get("retry_history", [])[-1:] == [trial.number]), None)
        reason = (
            f"its worker ({trial.user_attrs.get(WORKER_ATTR, 'unknown')}) died: no heartbeat for "
            f"{self.settings.grace_period} s; "
            + (f"retried as trial {retry}" if retry is not None else f"max_retry={self.settings.max_retry} reached")
        )
        run_id = trial.user_attrs.get("mlflow_run_id")
        closed = ""
        if self.tracking_uri and run_id:
            try:
                if close_dead_run(self.tracking_uri, run_id, reason):
                    closed = f"; its MLflow run {run_id} is FAILED"
            except Exception as error:  # the retry is queued already; the run is closed at the study's end
                closed = f"; its MLflow run {run_id} stays RUNNING for now ({type(error).__name__}: {error})"
        print(f"search: trial {trial.number} FAIL {reason}{closed}", flush=True)


def fail_trials_of_ended_workers(
    study: optuna.Study, tracking_uri: str | None, error: BaseException | None
) -> list[int]:
    """FAIL the RUNNING trials of this machine's workers whose processes have ended, and end their runs: a launcher
    tears its workers down when the search is interrupted (joblib's, at Ctrl-C), sometimes before a worker could
    record its trial. Done at once, rather than by another worker once the trial's heartbeat is stale. `error`: what
    stopped the search (an interrupt ends the runs KILLED, anything else FAILED). Call it under the study lock."""
    import socket

    from optuna.trial import TrialState

    from vaelab.tracking.lifecycle import INTERRUPTED, end_run
    from vaelab.tracking.run import Run

    interrupted = isinstance(error, KeyboardInterrupt)
    reason = INTERRUPTED if interrupted else "its worker process ended without recording it"
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _is_alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "failure", reason)
        study.tell(trial.number, state=TrialState.FAIL)
        failed.append(trial.number)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if tracking_uri and run_id:
            run = Run(tracking_uri, run_id, experiment="")
            if run.client.get_run(run_id).info.status == "RUNNING":
                end_run(
                    run, error if interrupted else RuntimeError(reason), reason=reason, tags={"optuna.state": "FAIL"}
                )
    return failed


def _is_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def close_dead_run(tracking_uri: str, run_id: str, reason: str) -> bool:
    """End a run that a dead worker left RUNNING: FAILED, as its trial is, with `reason`. False if it had ended."""
    from mlflow.exceptions import MlflowException

    from vaelab.tracking.lifecycle import end_run
    from vaelab.tracking.run import Run

    run = Run(tracking_uri, run_id, experiment="")
    try:
        if run.client.get_run(run_id).info.status != "RUNNING":
            return False
    except MlflowException:  # not in this store (the dead worker logged elsewhere)
        return False
    end_run(run, RuntimeError(reason), reason=reason, tags={"optuna.state": "FAIL"})
    return True
