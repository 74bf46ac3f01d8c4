"""Optuna search: a study over a search space in conf/search/, each trial one vaelab training run.

A trial is `python pipelines/train.py <overrides>` in all but name: its config is conf/train.yaml composed with
the command line's overrides plus the trial's sampled ones (Hydra's compose API), and `training.train` trains it
as a nested MLflow run under the search's parent run. The search adds two Lightning callbacks and nothing else:
Optuna's pruning callback, which reports the metric every epoch and raises `TrialPruned`, and one that links the
trial and its MLflow run both ways. `train` ends a pruned trial's run KILLED with the tag `optuna.state=PRUNED`
(MLflow has no PRUNED status) and a failed one FAILED.

The study lives in persistent storage (optuna.db at the project root, or any SQLAlchemy URL), so it outlives the
process: `search.n_trials` is the study's *total* number of finished trials (COMPLETE, PRUNED or FAIL), and
rerunning the same command runs only the missing ones. Several processes can work on one study at once.

The objective is a validation metric (`search.metric`, val/elbo by default): test numbers never choose a model.
"""

from __future__ import annotations

import math
import re
import shlex
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.config import END_OF_TRAINING_METRICS, space_params, validate_search
from vaelab.errors import ConfigError, VaelabError

if TYPE_CHECKING:  # the heavy imports (optuna, lightning, mlflow) wait until the config is known to be valid
    import optuna

    from vaelab.tracking import Run

SEARCH_GROUP = "search"
DEFAULT_SEARCH = "default"
NOT_SEARCHABLE_GROUPS = ("search", "sweep")  # config groups a trial cannot choose
SUMMARY_ATTRS = ("val/elbo", "val/rec", "val/kl", "val/bpd", "val/nll_iw", "best_epoch", "epochs")
STORAGE_TIMEOUT_S = 60  # sqlite: how long a writer waits for another process's lock
# A running trial records a heartbeat; one silent for the grace period (its process died) is marked FAIL, so a
# crashed worker's trial neither blocks the study nor is waited for forever.
HEARTBEAT_S, GRACE_S = 30, 180


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

    @classmethod
    def from_config(cls, search: DictConfig, name: str) -> Settings:
        return cls(
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
        )


def default_storage() -> str:
    return f"sqlite:///{paths.store_root() / 'optuna.db'}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def display_url(url: str) -> str:
    """The storage URL without its password, for logs and tags."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_sampler(settings: Settings, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """TPE or random. A seeded sampler restarts its random stream in every process, so a resumed study would
    repeat its first trials' parameters: the seed is offset by the number of trials already in the study."""
    import optuna

    seed = None if settings.seed is None else settings.seed + trials_so_far
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


def open_study(settings: Settings, max_epochs: int | str) -> optuna.Study:
    """Create the study on first use, then load it with this process's sampler and pruner.

    Two processes creating the same sqlite study at once can fail with an IntegrityError, so creation is
    serialized by a file lock beside the database (optuna.db.lock).
    """
    import optuna
    from filelock import FileLock

    db = _sqlite_path(settings.storage)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock") if db else nullcontext():
        engine = {"connect_args": {"timeout": STORAGE_TIMEOUT_S}} if db else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            storage = optuna.storages.RDBStorage(
                settings.storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, direction=settings.direction, load_if_exists=True
        )
        if "metric" not in study.user_attrs:
            study.set_user_attr("metric", settings.metric)
            study.set_user_attr("search", settings.name)
            study.set_user_attr("space", settings.space)
    check_study_matches(study, settings)
    if study.user_attrs.get("space") != settings.space:
        print(f"search: note: study '{settings.study_name}' was started with another search space; trials differ")
    return optuna.load_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=build_sampler(settings, len(study.trials)),
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


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials running now, in any process (a crashed process's trial turns FAIL once its heartbeat is stale)."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def run_trials(study: optuna.Study, objective: Objective, settings: Settings) -> None:
    """Run trials until the study has search.n_trials finished ones, counting the ones other workers are running:
    each worker checks before it starts a trial, so workers sharing a study stop together instead of each
    finishing one more (only two starting at the same instant can overshoot by one)."""
    progress = Progress(settings)
    while len(finished_trials(study)) + len(running_trials(study)) < settings.n_trials:
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),  # a failed trial (an exception, a NaN) is FAIL and the study goes on
            callbacks=[progress],
            gc_after_trial=True,
        )


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
        print(
            f"search: trial {trial.number} {state} {outcome} | {best_text} | "
            f"{len(finished_trials(study))}/{self.settings.n_trials} finished | {params} | {seconds:.1f} s",
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

    def describe(self) -> str:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in self.counts.items())
        lines = [
            f"search: study '{self.study_name}' in {display_url(self.storage)}: "
            f"{sum(self.counts.values())} finished trials of search.n_trials={self.n_trials} ({counts})"
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

    from vaelab.tracking import Run

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Progress prints one line per trial instead
    settings = Settings.from_config(full.search, name=full.hydra.runtime.choices[SEARCH_GROUP])
    max_epochs = "auto" if "trainer.max_epochs" in searched else base.trainer.max_epochs
    study = open_study(settings, max_epochs)
    finished, running = len(finished_trials(study)), len(running_trials(study))
    missing = settings.n_trials - finished - running
    print(
        f"search: study '{settings.study_name}' in {display_url(settings.storage)}: "
        f"{finished} finished trials"
        + (f" and {running} running elsewhere" if running else "")
        + f", search.n_trials={settings.n_trials}: "
        + (f"running {missing} more" if missing > 0 else "nothing to run"),
        flush=True,
    )
    if missing <= 0:
        return write_report(study, settings, config_dir, parent=None)

    parent = None
    if base.get("logger") is not None:
        named = base.copy()
        named.tracking.run_name = base.tracking.run_name or f"{settings.study_name}/search"
        parent = Run.create(
            named,
            stage="search",
            overrides=list(argv),
            tags={"kind": "search", "search": settings.name},
            log_params=False,
        )
        parent.set_tags(
            {
                "optuna.study_name": settings.study_name,
                "optuna.storage": display_url(settings.storage),
                "optuna.metric": settings.metric,
                "optuna.direction": settings.direction,
                "optuna.pruner": settings.pruner,
                "vaelab.search_space": OmegaConf.to_yaml(OmegaConf.create(settings.space))[:5000],
            }
        )
    objective = Objective(
        config_dir, command.train, parse_space(full.search.space), settings, parent.run_id if parent else None
    )
    try:
        run_trials(study, objective, settings)
        result = write_report(study, settings, config_dir, parent)
    except BaseException as error:
        if parent:
            interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
            parent.end("KILLED" if interrupted else "FAILED", reason=f"{type(error).__name__}: {error}")
        raise
    if parent:
        parent.end("FINISHED")
    return result
