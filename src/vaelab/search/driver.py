"""Optuna search: a study over a search space in conf/search/, each trial one vaelab training run.

The study lives in persistent storage (optuna.db at the project root, or any SQLAlchemy URL), so it outlives the
process: `search.n_trials` is the study's *total* number of trials (each ends COMPLETE, PRUNED or FAIL), and
rerunning the same command runs only the missing ones.

Several workers (processes running the same command) can share one study, and together run exactly search.n_trials
trials: see vaelab.search.workers.

The objective is a validation metric (`search.metric`, val/elbo by default): test numbers never choose a model.

`search` reads the command line, opens the study and hands it to the workers' loop. The pieces, each a module:
- search_config: the command line, split into training and search overrides, and the validated search.* keys;
- search_space: the parameters a trial samples, each as a Hydra override;
- search_study: the study in its storage, its lock, its heartbeats, and a dead worker's trial failed and retried;
- search_objective: one trial, trained as `pipelines/train.py` would train it;
- search_workers: workers sharing one study and one MLflow parent run until it has search.n_trials trials;
- search_report: a line per finished trial, then the trials table, plots and best config the search leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from vaelab.config import problems, search_problems
from vaelab.errors import ConfigError
from vaelab.search.config import SEARCH_GROUP, CommandLine, OverrideError, Settings, compose_config, config_groups
from vaelab.search.objective import Objective
from vaelab.search.report import SearchResult, write_report
from vaelab.search.space import parse_space, space_problems
from vaelab.search.study import (
    StaleTrials,
    Tally,
    check_storage_is_optunas,
    display_url,
    fail_stale_trials,
    fixed_settings,
    open_study,
    study_lock,
)
from vaelab.search.workers import SharedParent, run_trials, running_parent
from vaelab.tracking.lifecycle import stop_signal


def quiet_once_stopped(record: logging.LogRecord) -> bool:
    """Optuna's warnings about a trial that Ctrl-C or SIGTERM stopped (a traceback of the interrupt) go unprinted:
    the search says in one line that it was interrupted and how to resume."""
    return stop_signal() is None


def search(argv: Sequence[str], config_dir: Path) -> SearchResult:
    """Run (or resume) the study that the command line describes, until it has search.n_trials finished trials."""
    command = CommandLine.parse(argv)
    groups = config_groups(config_dir)
    full = compose_config(config_dir, [*command.train, *command.search], hydra=True)
    found = problems(full) + search_problems(full) + space_problems(full, groups)
    if found:
        raise ConfigError(found)
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

    from vaelab.stages.preflight import check_buildable
    from vaelab.tracking.store import check_store, resolve_uri

    check_buildable(base)  # what every trial builds, judged before the study or any run exists
    if base.get("logger") is not None:
        check_store(base.tracking.uri)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Progress prints one line per trial instead
    optimize_log = logging.getLogger("optuna.study._optimize")
    if quiet_once_stopped not in optimize_log.filters:
        optimize_log.addFilter(quiet_once_stopped)
    settings = Settings.from_config(full.search, name=full.hydra.runtime.choices[SEARCH_GROUP])
    max_epochs = "auto" if "trainer.max_epochs" in searched else base.trainer.max_epochs
    tracking_uri = resolve_uri(base.tracking.uri) if base.get("logger") is not None else None
    check_storage_is_optunas(settings)  # before the lock file or the study is written beside or into it
    lock = study_lock(settings)
    study = open_study(settings, max_epochs, lock, StaleTrials(settings, tracking_uri), fixed_settings(command.train))
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
