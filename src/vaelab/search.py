"""Optuna search: a study over a search space in conf/search/, each trial one vaelab training run.

A trial is `python pipelines/train.py <overrides>` in all but name: its config is conf/train.yaml composed with
the command line's overrides plus the trial's sampled ones (Hydra's compose API), and `training.train` trains it
as a nested MLflow run under the search's parent run. The search adds two Lightning callbacks and nothing else:
Optuna's pruning callback, which reports the metric every epoch and raises `TrialPruned`, and one that links the
trial and its MLflow run both ways. `train` ends a pruned trial's run KILLED with the tag `optuna.state=PRUNED`
(MLflow has no PRUNED status) and a failed one FAILED.

The study lives in persistent storage (optuna.db at the project root, or any SQLAlchemy URL), so it outlives the
process: `search.n_trials` is the study's *total* number of trials (each ends COMPLETE, PRUNED or FAIL), and
rerunning the same command runs only the missing ones.

Several workers (processes running the same command) can share one study:
- Each claims its next trial under a file lock (beside a sqlite database), counting the trials every worker has
  started, so together they start exactly search.n_trials. A lock file cannot reach workers on other machines:
  with a server database those may, starting a trial at the same instant, overshoot by one.
- A running trial records a heartbeat in the storage (`search.heartbeat_interval`). Once it has been silent for
  `search.grace_period` seconds its worker is taken for dead: the worker that notices marks the trial FAIL,
  closes its MLflow run FAILED with the reason in `vaelab.failure`, and Optuna's RetryHeartbeatStaleTrialCallback
  queues a retry with the same parameters (up to `search.max_retry` times). A retry is an extra trial, with the
  system attribute `failed_trial` (`RetryHeartbeatStaleTrialCallback.retried_trial_number`), so it does not count
  towards search.n_trials and retries are counted apart.
- A worker with nothing left to start stays until the trials other workers run have ended, so that it can retry
  one whose worker dies, and so that the study is complete when the last worker leaves.
- The workers of one session share one MLflow parent run, named in the study's user attribute
  `mlflow_parent_run_id`: the first creates it, the others join it while it is RUNNING (its tag `vaelab.workers`
  counts them), and the last to finish writes the report into it and ends it. A later rerun, after the parent has
  ended, gets a parent of its own. A parent left RUNNING by a worker that was killed is joined and ended by the
  next one, which also closes any child run that a dead worker left RUNNING.

The objective is a validation metric (`search.metric`, val/elbo by default): test numbers never choose a model.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.config import END_OF_TRAINING_METRICS, space_params, validate_search
from vaelab.errors import ConfigError, VaelabError

if TYPE_CHECKING:  # the heavy imports (optuna, lightning, mlflow) wait until the config is known to be valid
    import optuna
    from filelock import FileLock

    from vaelab.tracking import Run

SEARCH_GROUP = "search"
DEFAULT_SEARCH = "default"
NOT_SEARCHABLE_GROUPS = ("search", "sweep")  # config groups a trial cannot choose
SUMMARY_ATTRS = ("val/elbo", "val/rec", "val/kl", "val/bpd", "val/nll_iw", "best_epoch", "epochs")
STORAGE_TIMEOUT_S = 60  # sqlite: how long a writer waits for another process's lock
# A running trial records a heartbeat; one silent for the grace period (its process died) is marked FAIL and
# retried, so a crashed worker's trial neither blocks the study nor is waited for forever. Defaults for search
# configs that predate the keys search.heartbeat_interval, search.grace_period and search.max_retry.
HEARTBEAT_S, GRACE_S, MAX_RETRY = 30, 180, 2
WAIT_POLL_S = 2.0  # how often a worker with nothing left to start looks at the other workers' trials
WORKER_ATTR = "worker"  # trial user attribute: the host:pid running it
RETRY_ATTR = "retry_of"  # trial user attribute of a retry: the trial whose dead worker it replaces
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow parent run of the workers now running it
OPENED_ATTR = "processes_opened"  # study user attribute: how many processes have opened it (for the sampler seed)


class OverrideError(VaelabError):
    """The command line is not a list of valid Hydra overrides for conf/train.yaml."""


class NonFiniteObjectiveError(RuntimeError):
    """A trial trained without error but its objective is NaN or infinite: the trial counts as failed."""


# The command line


@dataclass(frozen=True)
class CommandLine:
    """The search's command line, split: its own keys (search=<name>, search.*) and the training overrides,
    which every trial gets before its sampled ones."""

    train: list[str]
    search: list[str]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> CommandLine:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        try:
            parsed = OverridesParser.create().parse_overrides(list(argv))
        except HydraException as error:
            raise OverrideError(f"cannot parse the command line as Hydra overrides: {error}") from None
        train, search = [], []
        for override, text in zip(parsed, argv, strict=True):
            if override.is_sweep_override():
                raise OverrideError(f"{text}: a search takes single values (sweeps are `pipelines/train.py -m`)")
            key = override.key_or_group
            (search if key == SEARCH_GROUP or key.startswith(f"{SEARCH_GROUP}.") else train).append(text)
        if not any(re.match(rf"\+*{SEARCH_GROUP}=", text) for text in search):
            search.insert(0, f"{SEARCH_GROUP}={DEFAULT_SEARCH}")
        return cls(train=train, search=search)


def compose_config(config_dir: Path, overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as the entry points compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
    except HydraException as error:
        message = str(error).split("\nConfig search path")[0].strip()  # Hydra's search path is noise here
        raise OverrideError(f"invalid override: {message}") from None


def config_groups(config_dir: Path) -> dict[str, list[str]]:
    """The config groups a trial may choose between, and their options: {'arch': ['conv', 'mlp', 'resnet'], ...}."""
    return {
        folder.name: sorted(file.stem for file in folder.glob("*.yaml"))
        for folder in sorted(config_dir.iterdir())
        if folder.is_dir() and folder.name not in NOT_SEARCHABLE_GROUPS and any(folder.glob("*.yaml"))
    }


# The search space


def override_value(value: Any) -> str:
    """A value as Hydra override syntax: 0.001 -> '0.001', True -> 'true', [512, 256] -> '[512,256]'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in ("true", "false", "null", "inf", "nan")
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key (or a config group) and the distribution of its values."""

    name: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()  # as Optuna stores them: None, bool, int, float or str
    texts: tuple[str, ...] = ()  # each choice as override syntax

    @classmethod
    def from_spec(cls, name: str, spec: DictConfig) -> Param:
        if spec.type == "categorical":
            values = OmegaConf.to_container(spec.choices, resolve=True)
            texts = tuple(override_value(v) for v in values)
            # A list value (arch.hidden: [512, 256]) is stored in Optuna as its override text.
            choices = tuple(text if isinstance(v, list) else v for v, text in zip(values, texts, strict=True))
            return cls(name, "categorical", choices=choices, texts=texts)
        return cls(name, spec.type, spec.low, spec.high, bool(spec.get("log", False)), spec.get("step"))

    def suggest(self, trial: optuna.Trial) -> str:
        """Sample this parameter for `trial`, as a Hydra override."""
        if self.kind == "categorical":
            value = trial.suggest_categorical(self.name, list(self.choices))
            return f"{self.name}={self.texts[self.choices.index(value)]}"
        if self.kind == "int":
            value = trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        else:
            value = trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)
        return f"{self.name}={override_value(value)}"


def parse_space(space: DictConfig) -> list[Param]:
    return [Param.from_spec(name, spec) for name, spec in space_params(space).items()]


# Settings, storage and the study


@dataclass(frozen=True)
class Settings:
    """The validated `search.*` keys."""

    name: str  # the search space's file in conf/search/
    study_name: str
    storage: str  # an SQLAlchemy URL
    n_trials: int
    metric: str
    direction: str
    sampler: str
    seed: int | None
    pruner: str
    pruner_options: dict[str, Any]
    space: dict[str, Any]
    heartbeat_interval: int = HEARTBEAT_S  # seconds between a running trial's heartbeats
    grace_period: int = GRACE_S  # seconds of silence after which a trial's worker counts as dead
    max_retry: int = MAX_RETRY  # retries of a dead worker's trial

    @classmethod
    def from_config(cls, search: DictConfig, name: str) -> Settings:
        settings = cls(
            name=name,
            study_name=search.study_name,
            storage=search.storage or default_storage(),
            n_trials=search.n_trials,
            metric=search.metric,
            direction=search.direction,
            sampler=search.sampler,
            seed=search.seed,
            pruner=search.pruner,
            pruner_options=OmegaConf.to_container(search.get("pruner_options") or {}, resolve=True),
            space=OmegaConf.to_container(search.space, resolve=True),
            heartbeat_interval=search.get("heartbeat_interval", HEARTBEAT_S),
            grace_period=search.get("grace_period", GRACE_S),
            max_retry=search.get("max_retry", MAX_RETRY),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """The heartbeat keys, which vaelab.config does not know (Optuna takes whole seconds)."""

        def whole(value: object, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        found = []
        if not whole(self.heartbeat_interval, 1):
            found.append(("search.heartbeat_interval", self.heartbeat_interval, "an integer >= 1 (seconds)"))
        if not whole(self.grace_period, 1):
            found.append(("search.grace_period", self.grace_period, "an integer >= 1 (seconds)"))
        elif whole(self.heartbeat_interval, 1) and self.grace_period <= self.heartbeat_interval:
            # a live worker would be taken for dead between two of its own heartbeats
            allowed = f"an integer > search.heartbeat_interval ({self.heartbeat_interval})"
            found.append(("search.grace_period", self.grace_period, allowed))
        if not whole(self.max_retry, 0):
            found.append(("search.max_retry", self.max_retry, "an integer >= 0"))
        if found:
            raise ConfigError(found)


def default_storage() -> str:
    return f"sqlite:///{paths.store_root() / 'optuna.db'}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def display_url(url: str) -> str:
    """The storage URL without its password, for logs and tags."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_sampler(settings: Settings, offset: int) -> optuna.samplers.BaseSampler:
    """TPE or random. A seeded sampler restarts its random stream in every process, so a resumed study would
    repeat its first trials' parameters, and two workers started together would draw the same ones: the seed is
    offset by the number of trials already in the study plus the number of processes that opened it before."""
    import optuna

    seed = None if settings.seed is None else settings.seed + offset
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(settings: Settings, max_epochs: int | str) -> optuna.pruners.BasePruner:
    """The configured pruner; its steps are epochs (0-based), hyperband's resource runs up to max_epochs."""
    import optuna

    options = dict(settings.pruner_options.get(settings.pruner) or {})
    try:
        if settings.pruner == "median":
            return optuna.pruners.MedianPruner(**options)
        if settings.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(**{"max_resource": max_epochs, **options})
    except TypeError as error:
        raise OverrideError(f"search.pruner_options.{settings.pruner}: {error}") from None
    return optuna.pruners.NopPruner()


def study_lock(settings: Settings) -> FileLock:
    """The lock that makes a study's bookkeeping one worker at a time: creating the study, claiming a trial, failing
    and retrying a dead worker's trial, joining and ending the parent run. Two processes creating one sqlite study at
    once can fail with an IntegrityError, and sqlite ignores the row lock (SELECT ... FOR UPDATE) with which Optuna
    hands a queued trial to one worker only. Beside a sqlite database (optuna.db.lock); for a server database, in
    the project's store root, where it serializes this machine's workers only."""
    from filelock import FileLock

    db = _sqlite_path(settings.storage)
    path = Path(f"{db}.lock") if db else paths.store_root() / f".optuna-{_safe_name(settings.study_name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def open_study(settings: Settings, max_epochs: int | str, lock: FileLock, on_stale: StaleTrials) -> optuna.Study:
    """Create the study on first use, then load it with this process's sampler and pruner, and with heartbeats:
    `on_stale` is called for a trial whose worker died."""
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
        opened_before = study.user_attrs.get(OPENED_ATTR, 0)
        study.set_user_attr(OPENED_ATTR, opened_before + 1)
        seed_offset = len(study.trials) + opened_before
    check_study_matches(study, settings)
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
            f"{direction}, the direction of the existing study '{settings.study_name}' (or a new search.study_name)"
        )
        raise ConfigError([("search.direction", settings.direction, allowed)])
    metric = study.user_attrs.get("metric", settings.metric)
    if metric != settings.metric:
        allowed = f"{metric}, the metric of the existing study '{settings.study_name}' (or a new search.study_name)"
        raise ConfigError([("search.metric", settings.metric, allowed)])


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the trials whose worker died (silent for search.grace_period), calling StaleTrials for each.
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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Tally:
    """Where a study stands: what a worker decides its next step by (under the study lock) and what it reports."""

    trials: int  # the study's own trials in any state, retries not included: what search.n_trials counts
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
        return f"{self.finished} finished trials{running}, search.n_trials={n_trials}: {todo_text}"


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
            + (
                f"retried as trial {retry}"
                if retry is not None
                else f"search.max_retry={self.settings.max_retry} reached"
            )
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


def close_dead_run(tracking_uri: str, run_id: str, reason: str) -> bool:
    """End a run that a dead worker left RUNNING: FAILED, as its trial is, with `reason`. False if it had ended."""
    from mlflow.exceptions import MlflowException

    from vaelab.tracking import Run

    run = Run(tracking_uri, run_id, experiment="")
    try:
        if run.client.get_run(run_id).info.status != "RUNNING":
            return False
    except MlflowException:  # not in this store (the dead worker logged elsewhere)
        return False
    run.set_tags({"optuna.state": "FAIL"})
    run.end("FAILED", reason=reason)
    return True


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
    """Run trials until the study has search.n_trials of its own, no queued retries, and no trial running in
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


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


# One trial


def trial_callbacks(trial: optuna.Trial, metric: str, tags: dict[str, str]) -> list:
    """Optuna's pruning callback (reports `metric` after each validation epoch, raises TrialPruned when the pruner
    says so; not for a metric estimated only after training), and one that links the trial and its MLflow run as
    soon as the run exists: the run gets `tags`, the trial the user attribute `mlflow_run_id`, even when the trial
    later fails or is pruned."""
    from lightning.pytorch.callbacks import Callback
    from optuna_integration import PyTorchLightningPruningCallback

    class LinkRun(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            logger = trainer.logger
            run_id = getattr(logger, "run_id", None)
            if not trainer.is_global_zero or run_id is None:
                return
            trial.set_user_attr("mlflow_run_id", run_id)
            for key, value in tags.items():
                logger.experiment.set_tag(run_id, key, value)

    pruning = [] if metric in END_OF_TRAINING_METRICS else [PyTorchLightningPruningCallback(trial, monitor=metric)]
    return [*pruning, LinkRun()]


@dataclass
class Objective:
    """Train one trial and return its validation metric (raising makes the trial FAIL, TrialPruned PRUNED)."""

    config_dir: Path
    train_overrides: list[str]
    params: list[Param]
    settings: Settings
    parent_run_id: str | None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from vaelab.training import train

        overrides = [*self.train_overrides, *(param.suggest(trial) for param in self.params)]
        trial.set_user_attr("overrides", overrides)
        tags = {
            "optuna.study_name": self.settings.study_name,
            "optuna.trial_number": str(trial.number),
            "vaelab.overrides": " ".join(overrides),
        }
        if trial.user_attrs.get(RETRY_ATTR) is not None:
            tags["optuna.retry_of"] = str(trial.user_attrs[RETRY_ATTR])
        try:
            cfg = compose_config(self.config_dir, overrides)
            if cfg.tracking.run_name is None:  # a readable name in the MLflow UI; the config is otherwise train.py's
                cfg.tracking.run_name = f"{self.settings.study_name}/trial-{trial.number}"
            summary = train(
                cfg, callbacks=trial_callbacks(trial, self.settings.metric, tags), parent_run_id=self.parent_run_id
            )
        except optuna.TrialPruned:
            raise
        except (KeyboardInterrupt, SystemExit) as error:
            # Lightning turns Ctrl-C into a graceful stop and SystemExit, which Optuna would leave RUNNING; as a
            # KeyboardInterrupt the trial is recorded FAIL and the interrupt stops the search.
            trial.set_user_attr("failure", "interrupted")
            raise KeyboardInterrupt from error
        except Exception as error:
            trial.set_user_attr("failure", f"{type(error).__name__}: {error}"[:2000])
            raise
        trial.set_user_attr("mlflow_run_id", summary["run_id"])
        for key in SUMMARY_ATTRS:
            if key in summary:
                trial.set_user_attr(key, float(summary[key]))
        value = float(summary[self.settings.metric])
        if not math.isfinite(value):
            # Training finished, but a NaN or infinite objective ranks nowhere: the trial FAILs, and so does its run.
            from vaelab.tracking import Run

            reason = f"non-finite {self.settings.metric} ({value})"
            trial.set_user_attr("failure", reason)
            Run.attach(cfg.tracking.uri, summary["run_id"]).end("FAILED", reason=reason)
            raise NonFiniteObjectiveError(reason)
        return value


# Progress and the report


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass
class Progress:
    """An Optuna callback that prints one line per finished trial: value, state, the best so far."""

    settings: Settings

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state.name
        if state == "COMPLETE":
            outcome = f"{self.settings.metric} {_format(trial.value)}"
        elif state == "PRUNED":
            last = trial.last_step
            outcome = f"at epoch {last} ({self.settings.metric} {_format(trial.intermediate_values.get(last))})"
        else:
            outcome = trial.user_attrs.get("failure") or trial.system_attrs.get("fail_reason", "")
            outcome = outcome.splitlines()[0][:160] if outcome else ""
        best = best_trial(study)
        best_text = f"best {_format(best.value)} (trial {best.number})" if best else "best -"
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        tally = Tally.of(study)
        retries = f" + {tally.retries} retries" if tally.retries else ""
        retry = f" (retry of trial {trial.user_attrs[RETRY_ATTR]})" if RETRY_ATTR in trial.user_attrs else ""
        print(
            f"search: trial {trial.number}{retry} {state} {outcome} | {best_text} | "
            f"{tally.done}/{self.settings.n_trials} finished{retries} | {params} | {seconds:.1f} s",
            flush=True,
        )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def best_experiment_yaml(config_dir: Path, overrides: Sequence[str], header: str) -> str:
    """The overrides as a `# @package _global_` experiment file: group choices go into its defaults list, values
    (as the composed config has them) into its body. `train.py experiment=<file>` then composes the same config
    as `train.py <overrides>`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config(config_dir, overrides, hydra=True)
    groups = cfg.hydra.runtime.choices
    includes: list[Any] = []
    body = OmegaConf.create()
    skipped = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(list(overrides)), strict=True):
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or key in NOT_SEARCHABLE_GROUPS:
            skipped.append(text)
        elif key == "experiment":
            includes.insert(0, f"/experiment/{override.value()}")  # its values first, then ours
        elif key in groups:
            includes.append({f"override /{key}": override.value()})
        else:
            value = OmegaConf.select(cfg, key)
            OmegaConf.update(body, key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    document = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*includes, "_self_"], **OmegaConf.to_container(body)}))
    notes = "".join(f"# not expressible here (use the command above): {text}\n" for text in skipped)
    return f"# @package _global_\n{header}{notes}{document}"


@dataclass
class SearchResult:
    study_name: str
    storage: str
    n_trials: int
    counts: dict[str, int]
    parent_run_id: str | None = None
    best_number: int | None = None
    best_value: float | None = None
    best_run_id: str | None = None
    best_file: Path | None = None
    command: str | None = None
    metric: str = "val/elbo"
    retries: int = 0  # of the trials counted, retries of trials whose worker died (not in search.n_trials)

    def describe(self) -> str:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in self.counts.items())
        retries = f"; of them retries of trials whose worker died: {self.retries}" if self.retries else ""
        lines = [
            f"search: study '{self.study_name}' in {display_url(self.storage)}: "
            f"{sum(self.counts.values())} finished trials of search.n_trials={self.n_trials} ({counts}{retries})"
        ]
        if self.best_number is not None:
            lines.append(
                f"search: best trial {self.best_number}: {self.metric} {_format(self.best_value)} "
                f"(MLflow run {self.best_run_id})"
            )
        if self.best_file:
            lines.append(f"search: best config: {self.best_file}")
        if self.command:
            lines.append(f"search: reproduce: {self.command}")
        if self.parent_run_id:
            lines.append(f"search: MLflow parent run {self.parent_run_id} (make ui)")
        return "\n".join(lines)


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for trial in finished_trials(study):
        counts[trial.state.name] += 1
    return counts


def save_study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimization history, learning curves, parallel coordinates and parameter importances as PNGs
    (optuna.visualization.matplotlib: plotly's PNG export would need kaleido and a browser). A plot that
    cannot be drawn yet (too few completed trials, a single parameter value) is left out, with a note."""
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    from vaelab.figures import save_figure

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots = {
        "optimization_history": (optuna_plots.plot_optimization_history, 1),
        "intermediate_values": (optuna_plots.plot_intermediate_values, 1),
        "parallel_coordinate": (optuna_plots.plot_parallel_coordinate, 1),
        "param_importances": (optuna_plots.plot_param_importances, 2),
    }
    saved = []
    for name, (plot, needs) in plots.items():
        if complete < needs:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" plots; flat axes when a parameter has one value
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            saved.append(save_figure(figure, folder / f"{name}.png"))
        except Exception as error:  # a missing plot must not cost the study's report
            print(f"search: note: no {name} plot ({type(error).__name__}: {error})")
    return saved


def write_report(study: optuna.Study, settings: Settings, config_dir: Path, parent: Run | None) -> SearchResult:
    """The study's trials table, plots and best config, in outputs/<parent_run_id>/ and logged to the parent."""
    result = SearchResult(
        study_name=settings.study_name,
        storage=settings.storage,
        n_trials=settings.n_trials,
        counts=state_counts(study),
        parent_run_id=parent.run_id if parent else None,
        metric=settings.metric,
        retries=Tally.of(study).retries,
    )
    best = best_trial(study)
    if best is not None:
        result.best_number, result.best_value = best.number, best.value
        result.best_run_id = best.user_attrs.get("mlflow_run_id")
        overrides = best.user_attrs.get("overrides", [])
        result.command = shlex.join(["python", "pipelines/train.py", *overrides])
    if parent is None:
        return result

    out_dir = paths.run_dir(parent.run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "trials.csv"
    study.trials_dataframe().to_csv(table, index=False)
    parent.log_artifact(table)
    plots = save_study_plots(study, out_dir / "plots")
    if plots:
        parent.log_artifact(out_dir / "plots", "plots")

    metrics = {f"search/{state.lower()}": float(n) for state, n in result.counts.items()}
    metrics["search/retries"] = float(result.retries)
    if best is not None:
        experiment = f"best_{_safe_name(settings.study_name)}"
        result.best_file = out_dir / "experiment" / f"{experiment}.yaml"
        try:
            where = result.best_file.parent.parent.relative_to(paths.project_root())
        except ValueError:
            where = result.best_file.parent.parent
        via_file = f"python pipelines/train.py --config-dir {shlex.quote(str(where))} experiment={experiment}"
        header = (
            f"# Best trial {best.number} of the Optuna study '{settings.study_name}': {settings.metric} = "
            f"{best.value:.4f}\n# (MLflow run {result.best_run_id}). Train it again with\n#   {via_file}\n"
            f"# or, equivalently,\n#   {result.command}\n"
        )
        result.best_file.parent.mkdir(parents=True, exist_ok=True)
        result.best_file.write_text(best_experiment_yaml(config_dir, best.user_attrs.get("overrides", []), header))
        command = out_dir / "reproduce.sh"
        command.write_text(
            f"#!/bin/sh\n# best trial {best.number} of study '{settings.study_name}'\n{result.command}\n"
        )
        parent.log_artifact(result.best_file, "best")
        parent.log_artifact(command, "best")
        metrics[f"best/{settings.metric}"] = best.value
        parent.set_tags(
            {
                "optuna.best_trial": str(best.number),
                "vaelab.best_run_id": result.best_run_id or "",
                "vaelab.best_command": result.command,
            }
        )
    parent.log_metrics(metrics)
    return result


# The parent run the workers share


def running_parent(study: optuna.Study, tracking_uri: str) -> Run | None:
    """The study's parent run (its user attribute), if it is in this tracking store and still RUNNING."""
    from mlflow.exceptions import MlflowException

    from vaelab.tracking import Run

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
        from vaelab.tracking import Run, resolve_uri

        with lock:
            run = running_parent(study, resolve_uri(base.tracking.uri))
            if run is not None:
                workers = int(run.client.get_run(run.run_id).data.tags.get("vaelab.workers", "1")) + 1
                run.set_tags({"vaelab.workers": str(workers)})
                print(f"search: joining MLflow parent run {run.run_id} (worker {workers} of this session)", flush=True)
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
                    "optuna.pruner": settings.pruner,
                    "vaelab.search_space": OmegaConf.to_yaml(OmegaConf.create(settings.space))[:5000],
                    "vaelab.workers": "1",
                }
            )
            study.set_user_attr(PARENT_ATTR, run.run_id)
            return cls(run, lock)

    def status(self) -> str:
        return self.run.client.get_run(self.run.run_id).info.status

    def reopen_if_ended(self) -> None:
        """Before a trial starts (under the lock): a worker with a smaller search.n_trials, or one that stopped on
        an error, may have ended the parent meanwhile. Its trials still belong under it."""
        if self.status() != "RUNNING":
            from vaelab.tracking import Run

            Run.reopen(self.run.uri, self.run.run_id)

    def finish(self, study: optuna.Study, settings: Settings, config_dir: Path) -> SearchResult:
        """The last worker out writes the report and ends the parent FINISHED; the others only report."""
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
            self.run.end("FINISHED")
            return result

    def abandon(self, study: optuna.Study, error: BaseException) -> None:
        """This worker stops on an error or Ctrl-C: it ends the parent KILLED or FAILED, unless other workers still
        run trials under it (the last of them ends it)."""
        interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
        with self.lock:
            try:
                fail_stale_trials(study)
                busy = Tally.of(study).running
            except Exception:  # the storage itself may be what failed
                busy = ()
            if busy:
                print("search: this worker stops; the MLflow parent run stays open for the workers still running")
                return
            self.run.end("KILLED" if interrupted else "FAILED", reason=f"{type(error).__name__}: {error}")


# The search


def search(argv: Sequence[str], config_dir: Path) -> SearchResult:
    """Run (or resume) the study that the command line describes, until it has search.n_trials finished trials."""
    command = CommandLine.parse(argv)
    groups = config_groups(config_dir)
    full = compose_config(config_dir, [*command.train, *command.search], hydra=True)
    validate_search(full, groups)
    base = compose_config(config_dir, command.train)  # what every trial starts from, with no search keys
    searched = {param.name for param in parse_space(full.search.space)}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for text, override in zip(command.train, OverridesParser.create().parse_overrides(command.train), strict=True):
        if override.key_or_group in searched:
            raise OverrideError(
                f"{text}: {override.key_or_group} is searched (search.space.{override.key_or_group}); drop the "
                f"override, or take it out of the space with ~search.space.{override.key_or_group}"
            )

    import optuna

    from vaelab.tracking import resolve_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Progress prints one line per trial instead
    settings = Settings.from_config(full.search, name=full.hydra.runtime.choices[SEARCH_GROUP])
    max_epochs = "auto" if "trainer.max_epochs" in searched else base.trainer.max_epochs
    tracking_uri = resolve_uri(base.tracking.uri) if base.get("logger") is not None else None
    lock = study_lock(settings)
    study = open_study(settings, max_epochs, lock, StaleTrials(settings, tracking_uri))
    with lock:
        fail_stale_trials(study)
        tally = Tally.of(study)
        # a worker killed after the study's last trial left the parent RUNNING: this one ends it
        orphaned = tracking_uri is not None and running_parent(study, tracking_uri) is not None
    where = f"study '{settings.study_name}' in {display_url(settings.storage)}"
    print(f"search: {where}: {tally.describe(settings.n_trials)}", flush=True)
    if tally.next_step(settings.n_trials) == "done" and not orphaned:
        return write_report(study, settings, config_dir, parent=None)

    parent = SharedParent.join(study, base, settings, argv, lock) if tracking_uri else None
    objective = Objective(
        config_dir, command.train, parse_space(full.search.space), settings, parent.run.run_id if parent else None
    )
    try:
        run_trials(study, objective, settings, lock, parent)
        if parent is None:
            return write_report(study, settings, config_dir, parent=None)
        return parent.finish(study, settings, config_dir)
    except BaseException as error:
        if parent:
            parent.abandon(study, error)
        raise
