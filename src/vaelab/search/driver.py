"""Optuna search as a Hydra sweeper (`hydra/sweeper=optuna`, src/hydra_plugins/): a study over a search space in
Hydra's sweeper syntax (conf/hparams_search/), each trial one vaelab training run.

The study lives in persistent storage (optuna.db at the project root, or any SQLAlchemy URL), so it outlives the
process: `hydra.sweeper.n_trials` is the study's *total* number of trials (each ends COMPLETE, PRUNED or FAIL), and
rerunning the same command runs only the missing ones.

Trials run asynchronously. With Hydra's basic launcher they run one at a time in this process (ask, compose, train,
tell); with an out-of-process launcher (joblib, slurm) the launcher starts n_jobs workers, each of which claims,
trains and reports trials against the study's storage until the study has n_trials: no worker waits for a batch.
Several commands may also run the same search at once, and share the work the same way (vaelab.search.workers).

The objective is a validation metric (`hydra.sweeper.metric`, val/elbo by default): test numbers never choose a
model.

`sweep` reads the command line, checks everything before anything is written, opens the study and the MLflow
parent run (the sweeper's own: the multirun's sweep callback creates none), and hands the study to the workers.
The pieces, each a module:
- search_config: the validated hydra.sweeper.* keys, and composing a trial's config;
- search_space: the parameters a trial samples, each as a Hydra override;
- search_study: the study in its storage, its lock, its heartbeats, and a dead worker's trial failed and retried;
- search_objective: one trial, trained as `pipelines/train.py` would train it;
- search_workers: workers sharing one study and one MLflow parent run until it has n_trials trials;
- search_report: a line per finished trial, then the trials table, plots and best config the search leaves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from vaelab.config import problems, search_problems
from vaelab.errors import INTERRUPTED_EXIT, ConfigError
from vaelab.search.config import (
    SPACE_GROUP,
    OverrideError,
    Settings,
    compose_config,
    config_groups,
    key,
)
from vaelab.search.objective import Objective
from vaelab.search.report import SearchResult, write_report
from vaelab.search.space import SWEEPER_PARAMS, Param, sweeper_entries, sweeper_space, sweeper_space_problems
from vaelab.search.study import (
    StaleTrials,
    Tally,
    build_pruner,
    build_sampler,
    check_storage_is_optunas,
    display_url,
    fail_stale_trials,
    fail_trials_of_ended_workers,
    fixed_settings,
    open_study,
    study_lock,
)
from vaelab.search.workers import SharedParent, TrialWorker, quiet_optuna, run_trials, running_parent

if TYPE_CHECKING:
    from hydra.types import HydraContext

IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# The hydra overrides that say what the search was (kept on its parent run beside the task overrides).
SEARCH_HYDRA_OVERRIDES = ("hydra/sweeper", "hydra.sweeper", "hydra/launcher", "hydra.launcher")


@dataclass(frozen=True)
class Plan:
    """A search as its command line and config ask for it, checked before anything is written."""

    settings: Settings
    train: list[str]  # the training overrides every trial gets before its sampled ones
    params: list[Param]  # what each trial samples
    base: DictConfig  # conf/train.yaml composed with `train`: what every trial starts from
    config_name: str
    command: list[str]  # the command line's overrides, for the parent run
    in_process: bool  # Hydra's basic launcher: trials run here, one at a time
    workers: int | None  # how many workers the launcher starts (None: in process)

    @property
    def max_epochs(self) -> int | str:
        return (
            "auto" if any(param.name == "trainer.max_epochs" for param in self.params) else self.base.trainer.max_epochs
        )

    @property
    def tracking_uri(self) -> str | None:
        from vaelab.tracking.store import resolve_uri

        return resolve_uri(self.base.tracking.uri) if self.base.get("logger") is not None else None

    def objective(self, parent_run_id: str | None) -> Objective:
        return Objective(None, self.config_name, self.train, self.params, self.settings, parent_run_id)


def read_plan(config: DictConfig, arguments: Sequence[str]) -> Plan:
    """The search that `config` (the multirun's, with its hydra node) and the command line describe: the space is
    hydra.sweeper.params plus the command line's sweep overrides; a plain override of a searched key fixes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as error:
        raise OverrideError(f"cannot parse the command line as Hydra overrides: {error}") from None
    entries = sweeper_entries(config.hydra.sweeper.get("params"))
    train: list[str] = []
    for text, override in zip(arguments, parsed, strict=True):
        name = override.key_or_group
        if name == SPACE_GROUP:
            continue  # its space is in `entries`; its settings in hydra.sweeper
        if override.is_sweep_override():
            entries[name] = text.partition("=")[2]
            continue
        if name in entries:
            print(f"search: {name} is fixed at {override.value()} by the command line, not searched", flush=True)
            del entries[name]
        train.append(text)
    try:
        space = sweeper_space(entries)
    except ConfigError:  # reported below, beside what else is wrong
        space = None
    config_name = str(config.hydra.job.config_name or "train")
    base = compose_config(None, [*train, *(space.fixed if space else [])], config_name=config_name)
    found = problems(base) + search_problems(base, config.hydra.sweeper)
    found += sweeper_space_problems(base, entries, config_groups())
    if not entries:
        allowed = (
            f"a search space: hparams_search=<name> (conf/hparams_search/), or {SWEEPER_PARAMS}.<key>, or a sweep "
            "override such as 'objective.beta=tag(log,interval(0.5,4))'"
        )
        found.append((SWEEPER_PARAMS, "{}", allowed))
    launcher = str(config.hydra.launcher.get("_target_"))
    in_process = launcher == IN_PROCESS_LAUNCHER
    n_jobs = config.hydra.sweeper.get("n_jobs")
    if in_process and n_jobs not in (None, 1):
        allowed = (
            "null or 1 with Hydra's basic launcher, which runs one trial at a time in this process: several workers "
            "need an out-of-process launcher (hydra/launcher=joblib, or slurm)"
        )
        found.append((key("n_jobs"), n_jobs, allowed))
    if found or space is None:
        raise ConfigError(found)
    choice = config.hydra.runtime.choices.get(SPACE_GROUP)
    name = "command line" if choice in (None, "null") else str(choice)
    settings = Settings.from_config(
        config.hydra.sweeper, name, {param.name: entries[param.name] for param in space.params}
    )
    workers = None if in_process else launcher_workers(config, settings)
    command = [o for o in config.hydra.overrides.hydra if o.lstrip("+~").startswith(SEARCH_HYDRA_OVERRIDES)]
    return Plan(
        settings, [*train, *space.fixed], space.params, base, config_name, [*command, *arguments], in_process, workers
    )


def launcher_workers(config: DictConfig, settings: Settings) -> int:
    """How many workers an out-of-process launcher starts: hydra.sweeper.n_jobs, else the launcher's own n_jobs
    (joblib's; -1 is one per CPU), else 1."""
    n_jobs = settings.n_jobs or config.hydra.launcher.get("n_jobs") or 1
    return os.cpu_count() or 1 if n_jobs < 0 else int(n_jobs)


def sweep(config: DictConfig, arguments: Sequence[str], hydra_context: HydraContext) -> SearchResult:
    """Run (or resume) the study that the config and command line describe, until it has n_trials finished trials;
    a bad setting is one line and exit status 2, Ctrl-C or SIGTERM exit status 130, a study in which no trial
    completed (every one failed, say) exit status 1 with the first failure's reason."""
    from vaelab.errors import exit_on_user_error
    from vaelab.logs import quiet_third_party

    quiet_third_party()
    with exit_on_user_error():
        try:
            result = run(config, arguments, hydra_context)
        except KeyboardInterrupt:
            print("search: interrupted; rerun the same command to resume the study", file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED_EXIT)
    print(result.describe(), flush=True)
    if result.completed_none:
        print(f"search: {result.failure()}", file=sys.stderr, flush=True)
        sys.exit(1)
    return result


def run(config: DictConfig, arguments: Sequence[str], hydra_context: HydraContext) -> SearchResult:
    plan = read_plan(config, arguments)  # before Optuna or torch is imported: a typo fails in a second

    from vaelab.stages.preflight import check_buildable
    from vaelab.tracking.store import check_store

    settings = plan.settings
    check_buildable(plan.base)  # what every trial builds, judged before the study or any run exists
    build_sampler(settings, 0)  # their arguments, judged by Optuna
    build_pruner(settings, plan.max_epochs)
    if plan.tracking_uri is not None:
        check_store(plan.base.tracking.uri)

    quiet_optuna()
    check_storage_is_optunas(settings)  # before the lock file or the study is written beside or into it
    lock = study_lock(settings)
    study = open_study(
        settings, plan.max_epochs, lock, StaleTrials(settings, plan.tracking_uri), fixed_settings(plan.train)
    )
    with lock:
        fail_stale_trials(study)
        tally = Tally.of(study)
        # a worker killed after the study's last trial left the parent RUNNING: this one ends it
        orphaned = plan.tracking_uri is not None and running_parent(study, plan.tracking_uri) is not None
    where = f"study '{settings.study_name}' in {display_url(settings.storage)}"
    print(f"search: {where}: {tally.describe(settings.n_trials)}", flush=True)
    if tally.next_step(settings.n_trials) == "done" and not orphaned:
        return write_report(study, settings, None, parent=None)

    parent = SharedParent.join(study, plan.base, settings, plan.command, lock) if plan.tracking_uri else None
    try:
        if plan.in_process:
            run_trials(study, plan.objective(parent.run.run_id if parent else None), settings, lock, parent)
        else:
            launch_workers(plan, tally, parent, config, hydra_context)
            with lock:  # a worker killed outright (out of memory, say) left its trial RUNNING
                fail_trials_of_ended_workers(study, plan.tracking_uri, None)
        if parent is None:
            return write_report(study, settings, None, parent=None)
        return parent.finish(study, settings, None)
    except BaseException as error:
        if not plan.in_process:
            with lock:
                fail_trials_of_ended_workers(study, plan.tracking_uri, error)
        if parent:
            parent.abandon(study, error)
        raise


def launch_workers(
    plan: Plan, tally: Tally, parent: SharedParent | None, config: DictConfig, hydra_context: HydraContext
) -> None:
    """Start the launcher's workers (no more than there are trials to run) and wait for them all; each runs trials
    until the study has n_trials (vaelab.search.workers.TrialWorker). A worker's own failure (not a trial's, which
    the study records) is raised here once every worker has ended."""
    from hydra.core.plugins import Plugins

    to_run = max(1, plan.settings.n_trials - tally.trials + tally.queued)
    workers = min(plan.workers or 1, to_run)
    launcher_name = config.hydra.runtime.choices.get("hydra/launcher")
    print(f"search: {workers} worker(s) on hydra/launcher={launcher_name}", flush=True)
    worker = TrialWorker(
        settings=plan.settings,
        config_name=plan.config_name,
        train=plan.train,
        params=plan.params,
        max_epochs=plan.max_epochs,
        fixed=fixed_settings(plan.train),
        tracking_uri=plan.tracking_uri,
        parent_run_id=parent.run.run_id if parent else None,
        experiment=parent.run.experiment if parent else None,
    )
    launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=worker, config=config)
    returns = launcher.launch([[] for _ in range(workers)], initial_job_idx=0)
    for job in returns:
        job.return_value  # noqa: B018 - raises the worker's exception, if it ended with one


def search(overrides: Sequence[str], config_dir: Path) -> SearchResult:
    """A search run from Python, as `python pipelines/train.py -m hydra/sweeper=optuna <overrides>` runs it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def never_called(cfg: DictConfig) -> Any:
        raise AssertionError("the optuna sweeper trains its trials itself")

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return GlobalHydra.instance().hydra.multirun(
            config_name="train",
            task_function=never_called,
            overrides=["hydra/sweeper=optuna", *overrides],
            with_log_configuration=False,
        )
