"""Hydra multirun sweeps: one parent MLflow run per sweep, one nested child run per job, a summary at the end.

    python pipelines/train.py -m model.latent_dim=2,8,32 model.beta=0.5,1,4 arch=mlp,conv
    python pipelines/train.py -m sweep=latent_beta_arch hydra/launcher=joblib hydra.launcher.n_jobs=2

How the pieces meet:
- `SweepCallback`, a Hydra callback (conf/train.yaml, `hydra.callbacks`), runs in the launching process.
  `on_multirun_start` creates the MLflow store and experiment before any job starts, so parallel workers never
  race on a fresh sqlite schema. It then creates the parent run and hands its id to the jobs: in an environment
  variable, which joblib's worker processes inherit since they start later, and in a file in the sweep folder,
  for launchers that run jobs elsewhere.
- `run_job` trains one job as a nested child run (pipelines/train.py calls it in `-m` mode). A job that fails
  (an invalid config, a NaN loss, a crash) gets a FAILED child run, prints one line and returns NaN instead of
  raising. Otherwise Hydra's sweeper would raise after the batch and skip `on_multirun_end`.
- `on_multirun_end` reads the child runs back from MLflow rather than from the jobs' return values, since a
  parallel or remote launcher may not return them. It writes the summary to outputs/<parent_run_id>/, logs it to
  the parent run and exits with status 1 if any job failed.

Sweeps select on validation metrics only: the best job is the one with the highest val/elbo.
"""

from __future__ import annotations

import atexit
import copy
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab import paths
from vaelab.files import write_text_atomic

if TYPE_CHECKING:
    from vaelab.tracking import Run

# vaelab.tracking (and so Lightning) is imported only where needed: Hydra instantiates SweepCallback for every run,
# and a single run's config typo should still fail in a second.
TAG_PREFIX = "vaelab."  # as in vaelab.tracking

PARENT_ENV = "VAELAB_SWEEP_RUN_ID"  # the parent run's id, for the jobs
PARENT_FILE = "parent_run_id"  # the same, in the Hydra sweep folder
JOB_TAG = f"{TAG_PREFIX}sweep_job"  # a child run's Hydra job number
JOB_OVERRIDES_TAG = f"{TAG_PREFIX}job_overrides"  # a child run's overrides, as a JSON list
SELECTION = "val/elbo"  # what picks the best job: validation only, higher is better
AGGREGATE_OVER = "seed"  # jobs that differ only in this key are one configuration
# The summary's metrics, as train() returns them: at the best checkpoint (val/nll_iw is estimated on it).
# Each child run also gets them as `best/<name>` metrics, since its `val/*` history ends at the last epoch.
METRICS = ("val/elbo", "val/nll_iw", "val/rec", "val/kl", "best_epoch")


def child_metric(name: str) -> str:
    return f"best/{name.removeprefix('best_')}"  # val/elbo -> best/val/elbo, best_epoch -> best/epoch


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def short_error(error: BaseException) -> str:
    """One line: the exception's type and message (a ConfigError's problems, one per line, joined by `; `)."""
    text = str(error).strip()
    if "\n" in text:  # a ConfigError lists one problem per line
        text = "; ".join(line.strip() for line in text.splitlines()[1:]) or text.splitlines()[0]
    return f"{type(error).__name__}: {text}"


# --- the jobs ---------------------------------------------------------------------------------------------------


def parent_run_id(sweep_dir: str) -> str:
    """The sweep's parent run: from the launching process's environment, else from the sweep folder."""
    found = os.environ.get(PARENT_ENV)
    if not found and (Path(sweep_dir) / PARENT_FILE).is_file():
        found = (Path(sweep_dir) / PARENT_FILE).read_text().strip()
    if not found:
        raise RuntimeError(
            "this multirun job has no parent MLflow run: conf/train.yaml's hydra.callbacks.vaelab_sweep must be set"
        )
    return found


def job_tags(num: int, overrides: list[str]) -> dict[str, str]:
    return {JOB_TAG: str(num), JOB_OVERRIDES_TAG: json.dumps(overrides)}


def run_job(cfg: DictConfig) -> float:
    """Train one multirun job as a nested child run; return its val/elbo, or NaN when it failed.

    A failure never propagates: the job's child run is FAILED with the reason in `vaelab.failure`, one plain line
    goes to stderr, and the sweep goes on. A config error, which train() raises before any run exists, still gets
    a FAILED child run (with the job's params), so the summary lists every job.
    """
    from vaelab.config import validate
    from vaelab.tracking import Run, resolve_uri

    hydra = HydraConfig.get()
    num, overrides = hydra.job.num, list(hydra.overrides.task)
    parent = parent_run_id(hydra.sweep.dir)
    label = f"job {num} [{' '.join(overrides)}]"
    started_ms = int(time.time() * 1000)
    try:
        validate(cfg)
        from vaelab.training import train

        summary = train(cfg, parent_run_id=parent)
    except Exception as error:
        run_id = record_failure(cfg, parent, num, overrides, error, started_ms)
        point_to(run_id, hydra.runtime.output_dir)
        print(f"vaelab: {label} FAILED: {short_error(error)} (run {run_id})", file=sys.stderr, flush=True)
        return math.nan
    point_to(str(summary["run_id"]), hydra.runtime.output_dir)
    run = Run(resolve_uri(cfg.tracking.uri), str(summary["run_id"]), cfg.tracking.experiment)
    run.set_tags(job_tags(num, overrides))
    run.log_metrics({child_metric(k): float(summary[k]) for k in METRICS})
    print(
        f"vaelab: {label} finished: val/elbo {summary['val/elbo']:.2f}, val/nll_iw {summary['val/nll_iw']:.2f} "
        f"(best epoch {summary['best_epoch']:.0f}), run {summary['run_id']}",
        flush=True,
    )
    return float(summary["val/elbo"])


def point_to(run_id: str | None, job_dir: str) -> None:
    """Hydra's folder for the job holds just its run id: its files are in outputs/<run_id>/."""
    if run_id:
        write_text_atomic(Path(job_dir) / "run_id", run_id + "\n")


def record_failure(
    cfg: DictConfig, parent: str, num: int, overrides: list[str], error: Exception, started_ms: int
) -> str | None:
    """The id of the job's FAILED child run: train() made and ended it if the failure came after the run started;
    otherwise (an invalid config or missing data) it is made here. None if even MLflow failed."""
    from vaelab.tracking import Run, resolve_uri

    try:
        uri = resolve_uri(cfg.tracking.uri)
        found = find_child(uri, parent, " ".join(overrides), started_ms)
        if found:
            run = Run(uri, found, cfg.tracking.experiment)
        else:
            run = Run.create(cfg, "train", overrides, tags={}, parent_run_id=parent, log_params=resolvable(cfg))
            run.end("FAILED", reason=short_error(error))
        run.set_tags(job_tags(num, overrides))
        return run.run_id
    except Exception as tracking_error:  # the store itself is the problem: the job still only fails
        print(f"vaelab: could not record the failed job in MLflow: {short_error(tracking_error)}", file=sys.stderr)
        return None


def resolvable(cfg: DictConfig) -> bool:
    """Can the config be flattened into params? (A broken interpolation cannot; then the run goes without.)"""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return False
    return True


def find_child(uri: str, parent: str, overrides: str, since_ms: int) -> str | None:
    """The child run that a job with these overrides started after `since_ms`, if train() got as far as making it."""
    for run in child_runs(uri, parent):
        if run.info.start_time >= since_ms and run.data.tags.get(f"{TAG_PREFIX}overrides") == overrides:
            return run.info.run_id
    return None


def child_runs(uri: str, parent: str) -> list:
    """Every run nested under `parent`, in any experiment of the store (a job may override tracking.experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiments, f"tags.mlflow.parentRunId = '{parent}'", max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --- the launching process ----------------------------------------------------------------------------------------


class SweepCallback(Callback):
    """Hydra callback: the parent run of a multirun, and its summary when the last job has ended."""

    def __init__(self) -> None:
        self.parent: Run | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"parent": None}  # Hydra ships its callbacks to joblib's workers; they need none of this state

    # Hydra turns an exception in a callback into a warning and carries on, so these methods exit themselves.

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("logger") is None:
            stop("a sweep tracks its jobs in MLflow: logger=none cannot be used with -m", status=2)
        try:
            self.start(config)
        except Exception as error:  # e.g. an unusable tracking.uri: one plain message before any job starts
            stop(f"cannot start the sweep: {short_error(error)}", status=2)

    def start(self, config: DictConfig) -> None:
        from vaelab.config import problems
        from vaelab.errors import ConfigError
        from vaelab.tracking import Run

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
        parent, self.parent = self.parent, None
        try:
            summary = summarize(parent, paths.run_dir(parent.run_id))
        except Exception as error:
            parent.end("FAILED", reason=f"the sweep's summary failed: {short_error(error)}")
            stop(f"the sweep's jobs ended, but its summary failed: {short_error(error)}", status=1)
        print(summary.console(), flush=True)
        if summary.failed:
            failed = ", ".join(str(row["job"]) for row in summary.failed)
            stop(
                f"{len(summary.failed)} of {len(summary.rows)} sweep jobs failed (job {failed}); "
                f"see {summary.folder / 'summary.md'}",
                status=1,
            )

    def end_abandoned(self) -> None:
        """At exit, a parent that never reached on_multirun_end: Ctrl-C (KILLED), or Hydra stopped the sweep."""
        if self.parent is None:
            return
        interrupted = getattr(sys, "last_type", None) is KeyboardInterrupt
        self.parent.end("KILLED" if interrupted else "FAILED", reason="the sweep stopped before all its jobs ended")


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


# --- the summary --------------------------------------------------------------------------------------------------


class Summary:
    """The jobs of one sweep as rows: job number, the swept values, status, metrics, run id."""

    def __init__(self, rows: list[dict[str, Any]], folder: Path):
        self.rows = rows
        self.folder = folder
        self.axes = swept_axes(rows)
        self.failed = [row for row in rows if row["status"] != "FINISHED"]
        self.aggregated = aggregate(rows, self.axes)
        finished = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row[SELECTION])]
        self.best = max(finished, key=lambda row: row[SELECTION], default=None)
        # With seeds, a configuration is best by its mean over seeds, not by one lucky seed.
        scored = [entry for entry in self.aggregated if math.isfinite(entry[f"{SELECTION} mean"])]
        self.best_config = max(scored, key=lambda entry: entry[f"{SELECTION} mean"], default=None)

    def best_config_line(self) -> str:
        entry = self.best_config
        if entry is None:
            return ""
        config = " ".join(f"{k}={v}" for k, v in entry["config"].items()) or "the one configuration"
        score = mean_std(entry[f"{SELECTION} mean"], entry[f"{SELECTION} std"])
        return (
            f"Best configuration by mean {SELECTION} over {AGGREGATE_OVER}s: {config} ({score}, n={entry['finished']})"
        )

    def job_table(self, columns: list[str] | None = None) -> tuple[list[str], list[list[Any]]]:
        """One row per job: the swept values, status, metrics at the best checkpoint, run id, failure reason."""
        header = columns or ["job", *self.axes, "status", *METRICS, "run_id", "failure"]
        cells = [{**row, **row["overrides"]} for row in self.rows]
        return header, [[c.get(h, "") for h in header] for c in cells]

    def aggregated_table(self, markdown: bool = False) -> tuple[list[str], list[list[Any]]]:
        """One row per configuration: mean and sample std over its seeds' finished jobs (one column as `mean ± std`
        when `markdown`)."""
        keys = [a for a in self.axes if a != AGGREGATE_OVER]
        if markdown:
            header = [*keys, "finished", *METRICS]
            rows = [
                [*row["config"].values(), f"{row['finished']}/{row['jobs']}"]
                + [mean_std(row[f"{m} mean"], row[f"{m} std"]) for m in METRICS]
                for row in self.aggregated
            ]
            return header, rows
        header = [*keys, "finished", "jobs"] + [f"{m} {s}" for m in METRICS for s in ("mean", "std")]
        rows = [[*row["config"].values()] + [row[h] for h in header[len(keys) :]] for row in self.aggregated]
        return header, rows

    def console(self) -> str:
        """A short table of the jobs, the mean ± std over seeds if any, and the best job."""
        columns = ["job", *self.axes, "status", "val/elbo", "val/nll_iw", "run_id"]
        lines = [
            f"\nSweep summary: {len(self.rows)} jobs, {len(self.failed)} failed ({self.folder})",
            text_table(*self.job_table(columns)),
        ]
        if self.aggregated:
            lines += [f"\nMean ± std over {AGGREGATE_OVER}s:", text_table(*self.aggregated_table(markdown=True))]
        if self.best:
            best = self.best
            lines.append(f"\nBest by {SELECTION}: job {best['job']} ({best[SELECTION]:.2f}), run {best['run_id']}")
        if self.best_config:
            lines.append(self.best_config_line())
        return "\n".join(lines)


def summarize(parent: Run, folder: Path) -> Summary:
    """Collect the children, write the tables and plots, log them and the best job to the parent, and end it."""
    summary = Summary(collect(parent.uri, parent.run_id), folder)
    files = write_tables(summary, folder)
    files += plot_metric_by_axis(summary.rows, summary.axes, folder / "val_elbo_by_axis.png")
    if "model.beta" in summary.axes:
        files += plot_rate_distortion(summary.rows, folder / "rate_distortion.png")
    for path in files:
        parent.log_artifact(path, "summary")
    tags = {f"{TAG_PREFIX}sweep_axes": ",".join(summary.axes), f"{TAG_PREFIX}jobs_failed": str(len(summary.failed))}
    metrics = {"sweep/jobs": float(len(summary.rows)), "sweep/jobs_failed": float(len(summary.failed))}
    if summary.best:
        best = summary.best
        tags |= {
            f"{TAG_PREFIX}best_run_id": best["run_id"],
            f"{TAG_PREFIX}best_job": str(best["job"]),
            f"{TAG_PREFIX}best_overrides": " ".join(f"{k}={v}" for k, v in best["overrides"].items()),
        }
        metrics |= {child_metric(m): best[m] for m in METRICS if math.isfinite(best[m])}
    if summary.best_config:
        tags[f"{TAG_PREFIX}best_config"] = " ".join(f"{k}={v}" for k, v in summary.best_config["config"].items())
    parent.set_tags(tags)
    parent.log_metrics(metrics)
    if summary.failed:
        parent.end("FAILED", reason=f"{len(summary.failed)} of {len(summary.rows)} jobs failed")
    else:
        parent.end("FINISHED")
    return summary


def collect(uri: str, parent: str) -> list[dict[str, Any]]:
    """One row per child run, in job order, with the metrics of its best checkpoint (blank unless FINISHED)."""
    rows = []
    for run in child_runs(uri, parent):
        tags, logged = run.data.tags, run.data.metrics
        overrides = json.loads(tags.get(JOB_OVERRIDES_TAG, "[]")) or tags.get(f"{TAG_PREFIX}overrides", "").split()
        finished = run.info.status == "FINISHED"
        failure = "" if finished else next(iter(tags.get(f"{TAG_PREFIX}failure", "").splitlines()), "")
        rows.append(
            {
                "job": int(tags.get(JOB_TAG, -1)),
                "overrides": dict(split_override(o) for o in overrides),
                "status": run.info.status,
                **{m: logged.get(child_metric(m), math.nan) if finished else math.nan for m in METRICS},
                "run_id": run.info.run_id,
                "failure": failure,
            }
        )
    return sorted(rows, key=lambda row: (row["job"], row["run_id"]))


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_axes(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs, in command-line order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys]
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


def aggregate(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Mean and sample std of each metric over the seeds of each configuration; none unless seeds were swept."""
    if AGGREGATE_OVER not in axes:
        return []
    keys = [a for a in axes if a != AGGREGATE_OVER]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["overrides"].get(k, "") for k in keys), []).append(row)
    aggregated = []
    for config, members in groups.items():
        done = [row for row in members if row["status"] == "FINISHED"]
        entry: dict[str, Any] = {
            "config": dict(zip(keys, config, strict=True)),
            "finished": len(done),
            "jobs": len(members),
        }
        for m in METRICS:
            values = [row[m] for row in done if math.isfinite(row[m])]
            entry[f"{m} mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{m} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        aggregated.append(entry)
    return aggregated


# --- writing ------------------------------------------------------------------------------------------------------


def cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.2f}"  # best_epoch is a whole number
    return str(value)


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(cell(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]) + "\n"


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *([cell(c) for c in row] for row in rows)]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if isinstance(c, float) and math.isnan(c) else c for c in row] for row in rows])
    return path


def write_tables(summary: Summary, folder: Path) -> list[Path]:
    """summary.csv/.md (one row per job) and, when seeds were swept, aggregate.csv/.md (mean ± std per config)."""
    header, rows = summary.job_table()
    files = [write_csv(folder / "summary.csv", header, rows)]
    title = f"# Sweep: {len(summary.rows)} jobs, {len(summary.failed)} failed\n\n"
    best = summary.best
    if best:
        title += f"Best by {SELECTION} (validation): job {best['job']}, run `{best['run_id']}`.\n\n"
    files.append(write_text_atomic(folder / "summary.md", title + markdown_table(header, rows)))
    if summary.aggregated:
        files.append(write_csv(folder / "aggregate.csv", *summary.aggregated_table()))
        text = f"# Mean ± sample std over {AGGREGATE_OVER}s\n\n{summary.best_config_line()}\n\n"
        text += markdown_table(*summary.aggregated_table(markdown=True))
        files.append(write_text_atomic(folder / "aggregate.md", text))
    return files


def axis_values(values: list[str]) -> tuple[list[float], list[str], bool]:
    """Plot positions for an axis's values: the numbers themselves if all are numeric, else category indices."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        categories = sorted(set(values))
        return [float(categories.index(v)) for v in values], categories, False
    return numbers, [], True


def plot_metric_by_axis(rows: list[dict[str, Any]], axes: list[str], path: Path) -> list[Path]:
    """val/elbo of every finished job against each swept value, with the mean over the other axes as a line."""
    done = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row[SELECTION])]
    if not done or not axes:
        return []
    import matplotlib.pyplot as plt

    from vaelab.figures import save_figure

    fig, panels = plt.subplots(1, len(axes), figsize=(3.6 * len(axes), 3.4), sharey=True, squeeze=False)
    for axis, panel in zip(axes, panels[0], strict=True):
        x, categories, numeric = axis_values([row["overrides"].get(axis, "") for row in done])
        y = [row[SELECTION] for row in done]
        panel.scatter(x, y, alpha=0.7)
        means = sorted({xi: statistics.fmean(yi for xj, yi in zip(x, y, strict=True) if xj == xi) for xi in x}.items())
        panel.plot([m[0] for m in means], [m[1] for m in means], color="black", lw=1, label="mean")
        if numeric and min(x) > 0 and max(x) / min(x) >= 8:
            panel.set_xscale("log", base=2)
        if categories:
            panel.set_xticks(range(len(categories)), categories)
        else:
            panel.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))])
            panel.minorticks_off()
        panel.set_xlabel(axis)
    panels[0][0].set_ylabel(f"{SELECTION} (nats, higher is better)")
    panels[0][0].legend()
    return [save_figure(fig, path)]


def plot_rate_distortion(rows: list[dict[str, Any]], path: Path) -> list[Path]:
    """Rate (val/kl) against distortion (val/rec), one point per finished job, labelled by beta.

    Each dashed line is one ELBO value: -elbo = rate + distortion, so moving along it trades one for the other.
    """
    done = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row["val/kl"])]
    if not done:
        return []
    import matplotlib.pyplot as plt

    from vaelab.figures import save_figure

    rate = [row["val/kl"] for row in done]
    distortion = [row["val/rec"] for row in done]
    beta = [float(row["overrides"].get("model.beta", "nan")) for row in done]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = ax.scatter(rate, distortion, c=beta, cmap="viridis", zorder=3)
    fig.colorbar(points, ax=ax, label="β")
    for r, d, b in zip(rate, distortion, beta, strict=True):
        ax.annotate(f"β={b:g}", (r, d), textcoords="offset points", xytext=(4, 4), fontsize=8)
    totals = [r + d for r, d in zip(rate, distortion, strict=True)]
    for total in {min(totals), max(totals)}:
        ax.plot([0, total], [total, 0], ls="--", lw=0.8, color="grey")
    ax.set_xlim(0, max(rate) * 1.15 + 1e-9)
    ax.set_ylim(min(distortion) * 0.95, max(distortion) * 1.05)
    ax.set_xlabel("rate: val/kl (nats)")
    ax.set_ylabel("distortion: val/rec (nats)")
    ax.set_title("Rate–distortion (dashed: constant ELBO)")
    return [save_figure(fig, path)]
