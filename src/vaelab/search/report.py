"""What a search tells: one line per finished trial (Progress), its outcome (SearchResult), and the report in
outputs/<parent_run_id>/, logged to the parent run: trials.csv, plots, the best trial as an experiment file
(experiment/best_<study>.yaml) and reproduce.sh. Names and values reach those two files shell-quoted (the command)
or as comment lines (`comment`), and without secrets (the trials' overrides are stored redacted)."""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from vaelab import paths
from vaelab.redaction import REDACTED
from vaelab.search.config import NOT_SEARCHABLE_GROUPS, Settings, compose_config
from vaelab.search.study import RETRY_ATTR, Tally, best_trial, display_url, finished_trials, safe_file_name
from vaelab.tracking.run import public_config

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from vaelab.tracking.run import Run

# The trials' overrides are stored without their secrets (vaelab.redaction): the command to reproduce one needs them.
SECRETS_NOTE = "Secrets are not stored: give each *** again, or pass it as ${oc.env:VAR}."


# Progress


OPTUNA_ARTIFACTS = "optuna_artifacts"  # the study artifacts' folder in the store root (make dashboard)


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


# The report


def best_experiment_yaml(config_dir: Path, overrides: Sequence[str], header: str) -> str:
    """The overrides as a `# @package _global_` experiment file: group choices go into its defaults list, values
    (as the composed config has them) into its body. `train.py experiment=<file>` then composes the same config
    as `train.py <overrides>`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config(config_dir, overrides, hydra=True)
    groups = cfg.hydra.runtime.choices
    values = public_config(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))  # no secrets
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
            OmegaConf.update(body, key, select(values, key))
    document = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*includes, "_self_"], **OmegaConf.to_container(body)}))
    notes = "".join(comment(f"not expressible here (use the command above): {text}") for text in skipped)
    return f"# @package _global_\n{header}{notes}{document}"


def select(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[int(part)] if isinstance(values, list) else values[part]
    return values


def comment(text: str) -> str:
    """`text` as comment lines of a shell script or YAML file: a line break in it (a study's name, an override's
    value) starts another comment line, never a command or a key."""
    return "".join(f"# {line}\n" for line in text.splitlines() or [""])


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
    retries: int = 0  # of the trials counted, retries of trials whose worker died (not in hydra.sweeper.n_trials)
    first_failure: str | None = None  # "trial N: <why>", for a study where no trial completed

    @property
    def completed_none(self) -> bool:
        """No trial of the study completed and some failed: there is no best trial, and the search failed. (Every
        trial pruned is the pruner's decision, as configured: no best trial either, but nothing failed.)"""
        return self.counts.get("COMPLETE", 0) == 0 and self.counts.get("FAIL", 0) > 0

    def failure(self) -> str:
        """What a search in which no trial completed and some failed says: why the first failed."""
        counts = ", ".join(f"{n} {state.lower()}" for state, n in self.counts.items() if n)
        why = f"; the first failure, {self.first_failure}" if self.first_failure else ""
        return f"no trial of study '{self.study_name}' completed ({counts or 'none finished'}){why}"

    def describe(self) -> str:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in self.counts.items())
        retries = f"; of them retries of trials whose worker died: {self.retries}" if self.retries else ""
        lines = [
            f"search: study '{self.study_name}' in {display_url(self.storage)}: "
            f"{sum(self.counts.values())} finished trials of n_trials={self.n_trials} ({counts}{retries})"
        ]
        if self.best_number is not None:
            lines.append(
                f"search: best trial {self.best_number}: {self.metric} {_format(self.best_value)} "
                f"(MLflow run {self.best_run_id})"
            )
        elif self.counts.get("PRUNED", 0) and not self.completed_none:  # no best trial: none completed
            lines.append("search: no best trial: the pruner stopped every trial (see hydra.sweeper.pruner)")
        if self.best_file:
            lines.append(f"search: best config: {self.best_file}")
        if self.command:
            lines.append(f"search: reproduce: {self.command}")
        if self.parent_run_id:
            lines.append(f"search: MLflow parent run {self.parent_run_id} (make ui)")
        return "\n".join(lines)


def first_failure(study: optuna.Study) -> str | None:
    """`trial N: <why>` for the study's first failed trial (the first line of its reason), or None."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        why = trial.user_attrs.get("failure") or trial.system_attrs.get("fail_reason") or "no reason recorded"
        return f"trial {trial.number}: {why.splitlines()[0][:300]}"
    return None


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for trial in finished_trials(study):
        counts[trial.state.name] += 1
    return counts


# Below this many complete trials, fANOVA's importances rest on too few points to rank parameters reliably.
RELIABLE_IMPORTANCE_TRIALS = 20


def metric_label(metric: str) -> str:
    """A searched metric with its unit: bits per dimension for val/bpd, nats per image for the others."""
    return f"{metric} (bits/dim)" if metric.endswith("bpd") else f"{metric} (nats)"


def whole_numbers(axis) -> None:
    """Ticks at whole numbers only (trials, epochs), where Optuna's axes may tick at 0.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def label_history(ax, metric: str, complete: int) -> None:
    ax.set_title(f"{metric} of each trial, and the best so far", fontsize=10)
    ax.set_xlabel("trial")
    whole_numbers(ax.xaxis)


def label_intermediate_values(ax, metric: str, complete: int) -> None:
    ax.set_title(f"{metric} after each epoch of each trial (a pruned trial stops early)", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label(metric))
    whole_numbers(ax.xaxis)


def label_parallel_coordinate(ax, metric: str, complete: int) -> None:
    """Names slanted away from each other on a figure as wide as they need; a colormap without Optuna's near-white
    end, so that the line of every trial shows (the best trials darkest, as Optuna has them)."""
    ax.set_title(f"Parameters of each complete trial, coloured by {metric}", fontsize=10, y=1.03)
    names = ax.get_xticklabels()
    ax.figure.set_size_inches(max(6.4, 1.7 * len(names) + 2.5), 4.8)
    for name in names:
        name.set(rotation=-25, ha="left", rotation_mode="anchor", fontsize=8)
    for lines in ax.collections:
        lines.set_cmap("viridis" if lines.get_cmap().name.endswith("_r") else "viridis_r")
        lines.set_linewidth(1.5)
        lines.set_clip_on(False)  # the worst and best trials' lines lie on the frame: drawn whole, not halved


def label_param_importances(ax, metric: str, complete: int) -> None:
    caution = (
        f"\nfrom only {complete} complete trials: unreliable below about {RELIABLE_IMPORTANCE_TRIALS}"
        if complete < RELIABLE_IMPORTANCE_TRIALS
        else f" ({complete} complete trials)"
    )
    ax.set_title(f"Importance of each parameter for {metric} (fANOVA){caution}", loc="left", fontsize=10)
    ax.figure.set_size_inches(max(7.5, ax.figure.get_size_inches()[0]), 4.8)
    ax.set_xlabel(f"share of the variance of {metric}")
    ax.set_ylabel("parameter")


def study_figures(study: optuna.Study, metric: str) -> dict[str, Figure]:
    """Optimization history, learning curves, parallel coordinates and parameter importances, by name, each
    labelled with the searched `metric` and its unit. A plot that cannot be drawn yet (too few complete trials,
    a single parameter value) is left out, with a note."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")  # Optuna draws through pyplot: no window on a desktop, no display needed on a server
    from optuna.visualization import matplotlib as optuna_plots

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    target = metric_label(metric)
    plots = {
        "optimization_history": (partial(optuna_plots.plot_optimization_history, target_name=target), label_history, 1),
        "intermediate_values": (optuna_plots.plot_intermediate_values, label_intermediate_values, 1),
        "parallel_coordinate": (
            partial(optuna_plots.plot_parallel_coordinate, target_name=target),
            label_parallel_coordinate,
            1,
        ),
        "param_importances": (
            partial(optuna_plots.plot_param_importances, target_name=target),
            label_param_importances,
            2,
        ),
    }
    figures = {}
    for name, (plot, label, needs) in plots.items():
        if complete < needs:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" plots; flat axes when a parameter has one value
                axes = plot(study)
            label(axes, metric, complete)
            figures[name] = axes.figure
        except Exception as error:  # a missing plot must not cost the study's report
            print(f"search: note: no {name} plot ({type(error).__name__}: {error})")
    return figures


def save_study_plots(study: optuna.Study, folder: Path, metric: str) -> list[Path]:
    """`study_figures` as PNGs in `folder` (optuna.visualization.matplotlib: plotly's PNG export would need
    kaleido and a browser)."""
    import matplotlib.pyplot as plt

    from vaelab.charts import save_figure

    saved = []
    for name, figure in study_figures(study, metric).items():
        try:
            saved.append(save_figure(figure, folder / f"{name}.png"))
        except Exception as error:  # a missing plot must not cost the study's report
            print(f"search: note: no {name} plot ({type(error).__name__}: {error})")
        finally:
            plt.close(figure)  # pyplot keeps every figure it made until it is closed
    return saved


def upload_to_study(study: optuna.Study, files: list[Path]) -> None:
    """`files` as artifacts of the study, in optuna_artifacts/ beside the store, where `make dashboard` shows them."""
    import optuna
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    folder = paths.store_root() / OPTUNA_ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for file in files:
            upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=study, mimetype="image/png")


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
    else:
        result.first_failure = first_failure(study)
    if parent is None:
        return result

    out_dir = paths.run_dir(parent.run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "trials.csv"
    study.trials_dataframe().to_csv(table, index=False)
    parent.log_artifact(table)
    plots = save_study_plots(study, out_dir / "plots", settings.metric)
    if plots:
        parent.log_artifact(out_dir / "plots", "plots")
        upload_to_study(study, plots)

    metrics = {f"search/{state.lower()}": float(n) for state, n in result.counts.items()}
    metrics["search/retries"] = float(result.retries)
    if best is not None:
        experiment = f"best_{safe_file_name(settings.study_name)}"
        result.best_file = out_dir / "experiment" / f"{experiment}.yaml"
        try:
            where = result.best_file.parent.parent.relative_to(paths.project_root())
        except ValueError:
            where = result.best_file.parent.parent
        via_file = f"python pipelines/train.py --config-dir {shlex.quote(str(where))} experiment={experiment}"
        header = comment(
            f"Best trial {best.number} of the Optuna study '{settings.study_name}': {settings.metric} = "
            f"{best.value:.4f}\n(MLflow run {result.best_run_id}). Train it again with\n  {via_file}\n"
            f"or, equivalently,\n  {result.command}\n{SECRETS_NOTE if REDACTED in result.command else ''}"
        )
        result.best_file.parent.mkdir(parents=True, exist_ok=True)
        result.best_file.write_text(best_experiment_yaml(config_dir, best.user_attrs.get("overrides", []), header))
        command = out_dir / "reproduce.sh"
        note = comment(SECRETS_NOTE) if REDACTED in result.command else ""
        about = comment(f"best trial {best.number} of study '{settings.study_name}'")
        command.write_text(f"#!/bin/sh\n{about}{note}{result.command}\n")
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
