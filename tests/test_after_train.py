"""eval.after_train: a run evaluated on test right after training, into its own MLflow run, alone or as a sweep's
job; and the sweep summary's test columns and gap-split figure (the gap split itself comes from the evaluate
stage with eval.gaps=true, so here its numbers are given)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from matplotlib.container import BarContainer

from helpers.config import TINY, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.charts import gap_split_figure
from vaelab.stages.train import train
from vaelab.sweep.summary import Summary, collect, write_figures, write_tables
from vaelab.tracking.run import Run

AFTER_TRAIN = [*TINY, "trainer.max_epochs=1", "eval.after_train=true", "eval.limit=50"]
TESTED = ("test/nll_iw", "test/nll_iw_se", "test/elbo", "test/inference_gap", "test/kl", "test/active_units")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_rows(path: Path) -> list[dict[str, str]]:
    """The Markdown table in `path` as one {header: cell} per body row."""
    lines = [line.strip().strip("|") for line in path.read_text().splitlines() if line.startswith("|")]
    header, *body = ([cell.strip() for cell in line.split("|")] for line in lines)
    return [dict(zip(header, cells, strict=True)) for cells in body[1:]]  # body[0]: the separator


@pytest.mark.integration
def test_a_run_with_after_train_logs_its_test_metrics_into_its_own_run_and_returns_them(project: Path):
    summary = train(make_config(*AFTER_TRAIN))

    [run] = all_runs(project)
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    for name in TESTED:
        assert run.data.metrics[name] == pytest.approx(summary[name]), name
    assert summary["test/nll_iw"] > 0 and summary["eval/n_images"] == 50
    assert summary["test/elbo"] <= -summary["test/nll_iw"] + 1e-6 + 4 * summary["test/nll_iw_se"]
    assert run.data.tags["vaelab.eval.checkpoint"].endswith(f"{summary['run_id']}/checkpoints/best.ckpt")
    assert "val/elbo" in summary and "vaelab.eval_failure" not in run.data.tags
    assert "evaluation/reconstructions.png" in artifact_paths(mlflow_client(project), run.info.run_id)


@pytest.mark.integration
def test_without_a_logger_a_run_with_after_train_still_returns_its_test_metrics(project: Path):
    summary = train(make_config(*AFTER_TRAIN, "logger=none"))
    assert all(name in summary for name in TESTED)
    assert not (project / "mlflow.db").exists()


@pytest.mark.integration
def test_a_failed_evaluation_after_training_leaves_the_run_finished_told_tagged_and_in_the_sweep_failure_column(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    def broken(cfg, publish=True):
        raise RuntimeError("test split unreadable")

    monkeypatch.setattr("vaelab.stages.evaluate.evaluate_checkpoint", broken)
    cfg = make_config(*AFTER_TRAIN)
    parent = Run.create(cfg, stage="sweep", overrides=[], tags={}, log_params=False)

    summary = train(cfg, parent_run_id=parent.run_id)

    run = mlflow_client(project).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["vaelab.eval_failure"] == "RuntimeError: test split unreadable"
    assert not any(name.startswith("test/") for name in summary) and "val/elbo" in summary
    told = capsys.readouterr().err
    assert "training finished, but its evaluation on test failed: RuntimeError: test split unreadable" in told
    assert f"python pipelines/evaluate.py run_id={summary['run_id']}" in told
    [row] = collect(f"sqlite:///{project / 'mlflow.db'}", parent.run_id)
    assert row["status"] == "FINISHED"
    assert row["failure"] == "evaluation on test failed: RuntimeError: test split unreadable"


@pytest.mark.integration
def test_a_test_estimate_over_the_time_budget_is_refused_before_the_run_exists(project: Path):
    from vaelab.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.iw_k"):
        train(make_config(*AFTER_TRAIN, "eval.iw_k=1000000000"))
    assert not (project / "mlflow.db").exists() or all_runs(project) == []


@pytest.mark.subprocess
def test_each_job_of_a_sweep_with_after_train_is_evaluated_into_its_child_run_and_the_summary_shows_test_columns(
    project: Path,
):
    done = run_entry("train.py", "-m", *AFTER_TRAIN, "model.latent_dim=2,4", root=project)

    runs = all_runs(project)
    [parent] = [r for r in runs if r.data.tags.get("vaelab.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert all(name in child.data.metrics for name in TESTED)
        # a job's evaluation stays in its own folder; the project's DVC outputs are the evaluate stage's alone
        assert (project / "outputs" / child.info.run_id / "evaluation" / "reconstructions.png").is_file()
    assert not (project / "metrics" / "eval.json").exists() and not (project / "plots" / "eval").exists()

    folder = project / "outputs" / parent.info.run_id
    rows = read_csv(folder / "summary.csv")
    nll = {c.info.run_id: c.data.metrics["test/nll_iw"] for c in children}
    assert sorted(row["run_id"] for row in rows) == sorted(nll)
    for row in rows:
        assert float(row["test/nll_iw"]) == pytest.approx(nll[row["run_id"]])
        assert row["test/elbo"] and row["test/inference_gap"] and row["test/kl"] and row["test/active_units"]
        assert "test/approximation_gap" not in row  # eval.gaps=false: no gap columns, and no gap figure
    throughput = {c.info.run_id: c.data.metrics["train/images_per_sec"] for c in children}  # at the last epoch
    assert all(float(row["train/images_per_sec"]) == pytest.approx(throughput[row["run_id"]]) for row in rows)
    header = next(line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("|"))
    assert "test/nll_iw" in header and "test/elbo" in header
    console = done.stdout.split("Sweep summary")[1]
    assert "test/nll_iw" in console and "test/inference_gap" in console
    assert not (folder / "gap_split.png").exists()
    assert "summary/gap_split.png" not in artifact_paths(mlflow_client(project), parent.info.run_id, "summary")
    best = max(rows, key=lambda r: float(r["val/elbo"]))
    assert parent.data.tags["vaelab.best_run_id"] == best["run_id"]
    assert parent.data.metrics["best/test/nll_iw"] == pytest.approx(float(best["test/nll_iw"]))


def gap_job(num: int, elbo: float, nll: float, gaps: tuple[float, float, float, float] | None, **overrides) -> dict:
    """A finished job's summary row; `gaps`: (approximation, its se, amortization, its se), or None (eval.gaps off)."""
    row = {
        "job": num,
        "overrides": {"data": "digits", **overrides},
        "status": "FINISHED",
        **{m: elbo for m in ("val/elbo", "val/nll_iw", "val/rec", "val/kl")},
        "best_epoch": 0.0,
        "test/nll_iw": nll,
        "test/elbo": -nll - 3.0,
        "test/inference_gap": 3.0,
        "test/kl": 2.0,
        "test/active_units": 4.0,
        "train/images_per_sec": 1000.0 + num,
        "run_id": f"run{num}",
        "failure": "",
    }
    if gaps is not None:
        keys = (
            "test/approximation_gap",
            "test/approximation_gap_se",
            "test/amortization_gap",
            "test/amortization_gap_se",
        )
        row |= dict(zip(keys, gaps, strict=True))
    return row


def test_the_gap_split_figure_stacks_amortization_on_approximation_with_one_bar_per_label():
    labels = ["posterior=diag_gaussian\nprior=standard", "posterior=iaf\nprior=vamp", "posterior=planar\nprior=mog"]
    approximation, approximation_se = [2.0, 1.0, 1.5], [0.1, 0.2, 0.3]
    amortization, amortization_se = [1.0, 0.5, 0.25], [0.05, 0.06, 0.07]

    ax = gap_split_figure(labels, approximation, approximation_se, amortization, amortization_se).axes[0]

    bars = ax.patches
    assert len(bars) == 2 * len(labels)
    lower, upper = bars[: len(labels)], bars[len(labels) :]
    assert [bar.get_height() for bar in lower] == pytest.approx(approximation)
    assert [bar.get_y() for bar in lower] == pytest.approx([0.0] * 3)
    assert [bar.get_height() for bar in upper] == pytest.approx(amortization)
    assert [bar.get_y() for bar in upper] == pytest.approx(approximation)  # stacked: a bar's top is the whole gap
    assert [bar.get_x() + bar.get_width() / 2 for bar in upper] == pytest.approx([0, 1, 2])
    assert [tick.get_text() for tick in ax.get_xticklabels()] == labels
    # Each part's error bar spans its top ± its standard error.
    stacks = [c for c in ax.containers if isinstance(c, BarContainer)]
    tops = [approximation, [a + b for a, b in zip(approximation, amortization, strict=True)]]
    for stack, top, se in zip(stacks, tops, [approximation_se, amortization_se], strict=True):
        segments = stack.errorbar.lines[2][0].get_segments()  # one [[x, low], [x, high]] per bar
        assert [low[1] for low, _ in segments] == pytest.approx([t - e for t, e in zip(top, se, strict=True)])
        assert [high[1] for _, high in segments] == pytest.approx([t + e for t, e in zip(top, se, strict=True)])


def test_the_summary_draws_the_gap_split_only_when_jobs_logged_both_gaps(tmp_path: Path):
    without = Summary(
        [gap_job(0, -30.0, 31.0, None, prior="standard"), gap_job(1, -29.0, 30.0, None, prior="mog")], tmp_path / "a"
    )
    assert [p.name for p in write_figures(without, tmp_path / "a")] == ["val_elbo_by_axis.png"]
    assert not (tmp_path / "a" / "gap_split.png").exists()

    rows = [
        gap_job(0, -30.0, 31.0, (2.0, 0.1, 1.0, 0.05), prior="standard"),
        gap_job(1, -29.0, 30.0, (1.0, 0.2, 0.5, 0.06), prior="mog"),
    ]
    drawn = write_figures(Summary(rows, tmp_path / "b"), tmp_path / "b")
    assert [p.name for p in drawn] == ["val_elbo_by_axis.png", "gap_split.png"]
    assert (tmp_path / "b" / "gap_split.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_summary_tables_show_the_test_metrics_and_the_gaps_with_their_standard_errors(tmp_path: Path):
    # Job 1 has the better test NLL, job 0 the better val/elbo: the best job is still chosen on validation.
    rows = [
        gap_job(0, -29.0, 31.0, (2.0, 0.1, 1.0, 0.05), prior="standard"),
        gap_job(1, -30.0, 30.0, (1.0, 0.2, 0.5, 0.06), prior="mog"),
    ]
    summary = Summary(rows, tmp_path)
    assert summary.best["job"] == 0
    write_tables(summary, tmp_path)

    [first, second] = read_csv(tmp_path / "summary.csv")
    assert list(first)[list(first).index("best_epoch") + 1 : list(first).index("run_id")] == [
        "test/nll_iw",
        "test/elbo",
        "test/inference_gap",
        "test/approximation_gap",
        "test/approximation_gap_se",
        "test/amortization_gap",
        "test/amortization_gap_se",
        "test/kl",
        "test/active_units",
        "train/images_per_sec",  # what each configuration costs to train
    ]
    assert float(second["test/nll_iw"]) == 30.0 and float(second["test/amortization_gap_se"]) == 0.06
    assert float(second["train/images_per_sec"]) == 1001.0
    [first_md, _] = markdown_rows(tmp_path / "summary.md")
    assert (first_md["test/approximation_gap"], first_md["test/amortization_gap"]) == ("2.00 ± 0.10", "1.00 ± 0.05")
    assert "test/approximation_gap_se" not in first_md and first_md["test/nll_iw"] == "31"
    assert "standard error" in (tmp_path / "summary.md").read_text()
    console = summary.console()
    assert "1.00 ± 0.20" in console and "test/nll_iw" in console and "test/active_units" in console


def test_a_summary_of_jobs_not_evaluated_has_no_test_columns(tmp_path: Path):
    rows = [gap_job(0, -29.0, math.nan, None, prior="standard"), gap_job(1, -30.0, math.nan, None, prior="mog")]
    for row in rows:
        for name in [k for k in row if k.startswith("test/")]:
            del row[name]
    summary = Summary(rows, tmp_path)
    write_tables(summary, tmp_path)
    assert not any(column.startswith("test/") for column in read_csv(tmp_path / "summary.csv")[0])
    assert "test/" not in summary.console()
