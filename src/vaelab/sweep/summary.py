"""A sweep's summary: its child runs read back from MLflow as rows, the swept axes, the mean and std over seeds, the
best job and configuration by validation ELBO; written as tables and plots, logged to the parent run, which it ends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from vaelab.files import write_text_atomic
from vaelab.sweep.plots import plot_gap_split, plot_metric_by_axis, plot_rate_distortion
from vaelab.sweep.runs import (
    AGGREGATE_OVER,
    EVAL_FAILURE_TAG,
    JOB_OVERRIDES_TAG,
    JOB_TAG,
    METRICS,
    SELECTION,
    TAG_PREFIX,
    TEST_METRICS,
    THROUGHPUT,
    child_metric,
    child_runs,
    split_override,
)
from vaelab.sweep.tables import is_number, markdown_table, mean_std, text_table, with_standard_errors, write_csv
from vaelab.tracking.lifecycle import INTERRUPTED, end_run
from vaelab.tracking.run import Run

NOT_RUN = "NOT RUN"  # the status of a job the sweep was stopped before starting
DELETED, MISSING = "DELETED", "MISSING"  # a job's run deleted from MLflow, or never found there: failed jobs
STATISTICS = ("mean", "std")  # pandas' std is the sample std (n - 1), the honest spread of a few seeds


class Summary:
    """The jobs of one sweep as rows: job number, the swept values, status, metrics, run id."""

    def __init__(self, rows: list[dict[str, Any]], folder: Path):
        self.rows = rows
        self.folder = folder
        self.axes = swept_axes(rows)
        self.not_run = [row for row in rows if row["status"] == NOT_RUN]
        self.failed = [row for row in rows if row["status"] not in ("FINISHED", NOT_RUN)]
        self.aggregated = aggregate(rows, self.axes)
        finished = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row[SELECTION])]
        self.best = max(finished, key=lambda row: row[SELECTION], default=None)
        # With seeds, a configuration is best by its mean over seeds, not by one lucky seed.
        scored = [entry for entry in self.aggregated if math.isfinite(entry[f"{SELECTION} mean"])]
        self.best_config = max(scored, key=lambda entry: entry[f"{SELECTION} mean"], default=None)
        # The test metrics some job logged (eval.after_train), in TEST_METRICS order: columns beside the val ones.
        self.tested = [m for m in TEST_METRICS if any(is_number(row.get(m)) for row in rows)]

    def best_config_line(self) -> str:
        entry = self.best_config
        if entry is None:
            return ""
        config = " ".join(f"{k}={v}" for k, v in entry["config"].items()) or "the one configuration"
        score = mean_std(entry[f"{SELECTION} mean"], entry[f"{SELECTION} std"])
        return (
            f"Best configuration by mean {SELECTION} over {AGGREGATE_OVER}s: {config} ({score}, n={entry['finished']})"
        )

    def job_table(self, columns: list[str] | None = None) -> pd.DataFrame:
        """One row per job: the swept values, status, metrics at the best checkpoint, its test metrics where it was
        evaluated, its training throughput, run id, failure reason."""
        columns = columns or ["job", *self.axes, "status", *METRICS, *self.tested, THROUGHPUT, "run_id", "failure"]
        return job_frame(self.rows).reindex(columns=columns)

    def aggregated_table(self, markdown: bool = False) -> pd.DataFrame:
        """One row per configuration: mean and sample std over its seeds' finished jobs (one column as `mean ± std`
        when `markdown`)."""
        keys = [a for a in self.axes if a != AGGREGATE_OVER]
        if markdown:
            rows = [
                {
                    **entry["config"],
                    "finished": f"{entry['finished']}/{entry['jobs']}",
                    **{m: mean_std(entry[f"{m} mean"], entry[f"{m} std"]) for m in METRICS},
                }
                for entry in self.aggregated
            ]
            return pd.DataFrame(rows, columns=[*keys, "finished", *METRICS])
        columns = [*keys, "finished", "jobs", *(f"{m} {s}" for m in METRICS for s in STATISTICS)]
        return pd.DataFrame([{**entry["config"], **entry} for entry in self.aggregated], columns=columns)

    def counts(self) -> str:
        """`4 jobs, 1 failed`, and how many were not run when the sweep was stopped."""
        not_run = f", {len(self.not_run)} not run" if self.not_run else ""
        return f"{len(self.rows)} jobs, {len(self.failed)} failed{not_run}"

    def console(self) -> str:
        """A short table of the jobs, the mean ± std over seeds if any, and the best job."""
        columns = ["job", *self.axes, "status", "val/elbo", "val/nll_iw", *self.tested, "run_id"]
        lines = [
            f"\nSweep summary: {self.counts()} ({self.folder})",
            text_table(with_standard_errors(self.job_table(columns))),
        ]
        if self.aggregated:
            lines += [f"\nMean ± std over {AGGREGATE_OVER}s:", text_table(self.aggregated_table(markdown=True))]
        if self.best:
            best = self.best
            lines.append(f"\nBest by {SELECTION}: job {best['job']} ({best[SELECTION]:.2f}), run {best['run_id']}")
        if self.best_config:
            lines.append(self.best_config_line())
        return "\n".join(lines)


def summarize(
    parent: Run,
    folder: Path,
    launched: list[list[str]] | None = None,
    pointers: dict[int, str] | None = None,
    stopped: BaseException | None = None,
) -> Summary:
    """Collect the children, write the tables and plots, log them and the best job to the parent, and end it.

    `launched`: the overrides of every job Hydra launched, in job order; `pointers`: the run id each job's folder
    names. A launched job whose run is missing or was deleted is one of the summary's failed jobs, named so.

    `stopped`: the interrupt that stopped the sweep early. The parent then ends KILLED, a child a launcher's worker
    left RUNNING is ended KILLED too, and each job without a run is listed as not run, in the tables and in the
    parent's tag vaelab.jobs_not_run."""
    rows = collect(parent.uri, parent.run_id)
    if stopped is not None:
        rows = close_running(parent.uri, rows, stopped)
    absent = NOT_RUN if stopped is not None else MISSING
    summary = Summary(with_missing_jobs(rows, launched or [], pointers or {}, absent), folder)
    files = write_tables(summary, folder) + write_figures(summary, folder)
    for path in files:
        parent.log_artifact(path, "summary")
    tags = {f"{TAG_PREFIX}sweep_axes": ",".join(summary.axes), f"{TAG_PREFIX}jobs_failed": str(len(summary.failed))}
    metrics = {"sweep/jobs": float(len(summary.rows)), "sweep/jobs_failed": float(len(summary.failed))}
    if stopped is not None:
        tags[f"{TAG_PREFIX}jobs_not_run"] = ",".join(str(row["job"]) for row in summary.not_run)
        metrics["sweep/jobs_not_run"] = float(len(summary.not_run))
    if summary.best:
        best = summary.best
        tags |= {
            f"{TAG_PREFIX}best_run_id": best["run_id"],
            f"{TAG_PREFIX}best_job": str(best["job"]),
            f"{TAG_PREFIX}best_overrides": " ".join(f"{k}={v}" for k, v in best["overrides"].items()),
        }
        metrics |= {child_metric(m): best[m] for m in METRICS if math.isfinite(best[m])}
        metrics |= {child_metric(m): best[m] for m in summary.tested if is_number(best.get(m))}
    if summary.best_config:
        tags[f"{TAG_PREFIX}best_config"] = " ".join(f"{k}={v}" for k, v in summary.best_config["config"].items())
    parent.set_tags(tags)
    parent.log_metrics(metrics)
    if stopped is not None:
        end_run(parent, stopped, reason=f"{INTERRUPTED}: {summary.counts()}")
        return summary
    failed = f"{len(summary.failed)} of {len(summary.rows)} jobs failed"
    end_run(parent, RuntimeError(failed) if summary.failed else None, reason=failed)
    return summary


def close_running(uri: str, rows: list[dict[str, Any]], stopped: BaseException) -> list[dict[str, Any]]:
    """The rows, with each child still RUNNING (a parallel launcher's worker stopped with the sweep) ended KILLED."""
    for row in rows:
        if row["status"] == "RUNNING":
            end_run(Run(uri, row["run_id"], ""), stopped)
            row["status"] = "KILLED"
    return rows


def collect(uri: str, parent: str) -> list[dict[str, Any]]:
    """One row per child run, in job order, with the metrics of its best checkpoint (blank unless FINISHED). A
    deleted run is a row of status DELETED: its job ran, but its results are gone."""
    job, listed, spaced, failure, eval_failure = (
        f"tags.{tag}"
        for tag in (JOB_TAG, JOB_OVERRIDES_TAG, f"{TAG_PREFIX}overrides", f"{TAG_PREFIX}failure", EVAL_FAILURE_TAG)
    )
    logged = {m: f"metrics.{child_metric(m)}" for m in METRICS} | {
        m: f"metrics.{m}" for m in (*TEST_METRICS, THROUGHPUT)
    }
    # A column is missing when no child has that tag or metric (every job failed before training, say).
    columns = ["run_id", "status", "deleted", job, listed, spaced, failure, eval_failure, *logged.values()]
    runs = child_runs(uri, parent, deleted=True).reindex(columns=columns)
    deleted = runs["deleted"].eq(True)
    runs["status"] = runs["status"].mask(deleted, DELETED)
    runs[failure] = runs[failure].astype(object).mask(deleted, "its MLflow run was deleted")
    finished = runs["status"] == "FINISHED"
    # A job stopped before it tagged its run has only the space-separated overrides that every run gets.
    overrides = [
        json.loads(as_list) or as_text.split()
        for as_list, as_text in zip(
            runs[listed].astype(object).fillna("[]"), runs[spaced].astype(object).fillna(""), strict=True
        )
    ]
    jobs = pd.DataFrame(
        {
            "job": pd.to_numeric(runs[job]).fillna(-1).astype(int),
            "overrides": [dict(map(split_override, job_overrides)) for job_overrides in overrides],
            "status": runs["status"],
            **{m: runs[column].where(finished) for m, column in logged.items()},
            "run_id": runs["run_id"],
            "failure": runs[failure].fillna("").map(first_line).where(~finished, runs[eval_failure].map(untested)),
        }
    )
    return jobs.sort_values(["job", "run_id"]).to_dict("records")


def with_missing_jobs(
    rows: list[dict[str, Any]], launched: list[list[str]], pointers: dict[int, str], absent: str = MISSING
) -> list[dict[str, Any]]:
    """`rows` plus a row with status `absent` (MISSING, or NOT RUN in a stopped sweep) for each job (launched, or
    with a folder) that no child run accounts for, in job order. A run without its job tag is matched to its job by
    the run id the job's folder names."""
    by_pointer = {run_id: num for num, run_id in pointers.items()}
    for row in rows:
        if row["job"] < 0 and row["run_id"] in by_pointer:
            row["job"] = by_pointer[row["run_id"]]
    seen = {row["job"] for row in rows}
    jobs = sorted(set(range(len(launched))) | pointers.keys())
    missing = [
        {
            "job": num,
            "overrides": dict(map(split_override, launched[num] if num < len(launched) else [])),
            "status": absent,
            **{m: math.nan for m in (*METRICS, *TEST_METRICS)},
            "run_id": pointers.get(num, ""),
            "failure": "" if absent == NOT_RUN else "no MLflow run of this job was found (deleted, or never created)",
        }
        for num in jobs
        if num not in seen
    ]
    return sorted(rows + missing, key=lambda row: (row["job"], row["run_id"]))


def first_line(text: str) -> str:
    return next(iter(text.splitlines()), "")


def untested(reason: Any) -> str:
    """A finished job's failure cell: why its evaluation after training failed, if it did."""
    return f"evaluation on test failed: {first_line(reason)}" if isinstance(reason, str) and reason else ""


def job_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The jobs with their overrides as columns, beside job number, status, metrics, run id and failure."""
    return pd.DataFrame([{**row, **row["overrides"]} for row in rows])


def swept_axes(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs, in command-line order."""
    overrides = pd.DataFrame([row["overrides"] for row in rows])  # columns in order of first appearance
    return [key for key in overrides.columns if overrides[key].nunique(dropna=False) > 1]


def aggregate(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Mean and sample std of each metric over the seeds of each configuration; none unless seeds were swept."""
    if AGGREGATE_OVER not in axes:
        return []
    keys = [a for a in axes if a != AGGREGATE_OVER]
    jobs = job_frame(rows)
    jobs[keys] = jobs[keys].fillna("")  # a job without one of the overrides
    jobs["finished"] = jobs["status"] == "FINISHED"
    metrics = jobs[list(METRICS)]
    jobs[list(METRICS)] = metrics.where(metrics.map(math.isfinite)).where(jobs["finished"], axis=0)
    table = jobs.groupby(keys or (lambda _: ""), sort=False).agg(  # no keys: the seed alone was swept
        finished=("finished", "sum"),
        jobs=("status", "size"),
        **{f"{m} {s}": (m, s) for m in METRICS for s in STATISTICS},
    )
    return [
        {"config": {k: entry[k] for k in keys}, **{column: entry[column] for column in table.columns}}
        for entry in table.reset_index().to_dict("records")
    ]


def write_tables(summary: Summary, folder: Path) -> list[Path]:
    """summary.csv/.md (one row per job) and, when seeds were swept, aggregate.csv/.md (mean ± std per config)."""
    jobs = summary.job_table()
    files = [write_csv(folder / "summary.csv", jobs)]
    title = f"# Sweep: {summary.counts()}\n\n"
    best = summary.best
    if best:
        title += f"Best by {SELECTION} (validation): job {best['job']}, run `{best['run_id']}`.\n\n"
    if any(f"{metric}_se" in summary.tested for metric in summary.tested):
        title += "Test metrics shown as `value ± se` carry their standard error across the test images.\n\n"
    files.append(write_text_atomic(folder / "summary.md", title + markdown_table(with_standard_errors(jobs))))
    if summary.aggregated:
        files.append(write_csv(folder / "aggregate.csv", summary.aggregated_table()))
        text = f"# Mean ± sample std over {AGGREGATE_OVER}s\n\n{summary.best_config_line()}\n\n"
        text += markdown_table(summary.aggregated_table(markdown=True))
        files.append(write_text_atomic(folder / "aggregate.md", text))
    return files


def write_figures(summary: Summary, folder: Path) -> list[Path]:
    """val/elbo by swept value; rate against distortion when β was swept; the gap split when jobs logged it."""
    files = plot_metric_by_axis(summary.rows, summary.axes, folder / "val_elbo_by_axis.png")
    if "objective.beta" in summary.axes:
        files += plot_rate_distortion(summary.rows, summary.axes, folder / "rate_distortion.png")
    files += plot_gap_split(summary.rows, summary.axes, folder / "gap_split.png")
    return files
