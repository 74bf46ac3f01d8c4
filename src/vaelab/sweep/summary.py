"""A sweep's summary: its child runs read back from MLflow as rows, the swept axes, the mean and std over seeds, the
best job and configuration by validation ELBO; written as tables and plots, logged to the parent run, which it ends."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from vaelab.files import write_text_atomic
from vaelab.sweep.plots import plot_metric_by_axis, plot_rate_distortion
from vaelab.sweep.runs import (
    AGGREGATE_OVER,
    JOB_OVERRIDES_TAG,
    JOB_TAG,
    METRICS,
    SELECTION,
    TAG_PREFIX,
    child_metric,
    child_runs,
)
from vaelab.sweep.tables import markdown_table, mean_std, text_table, write_csv
from vaelab.tracking.lifecycle import end_run
from vaelab.tracking.run import Run


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
    if "objective.beta" in summary.axes:
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
    failed = f"{len(summary.failed)} of {len(summary.rows)} jobs failed"
    end_run(parent, RuntimeError(failed) if summary.failed else None, reason=failed)
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
