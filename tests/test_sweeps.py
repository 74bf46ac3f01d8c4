"""Hydra multirun sweeps: one parent MLflow run, one nested child run per job, a summary when the sweep ends.

The end-to-end tests run `pipelines/train.py -m` in a subprocess, as a user would. Process start-up dominates
their time, so each runs one sweep and checks everything about it.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import statistics
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from helpers.config import CONF, TINY, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.config import problems
from vaelab.sweep.summary import Summary, aggregate, swept_axes

ONE_EPOCH = [o for o in TINY if not o.startswith(("trainer.max_epochs=", "model.latent_dim="))]
ONE_EPOCH += ["trainer.max_epochs=1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_FILES = {"summary.csv", "summary.md", "val_elbo_by_axis.png"}
RUN_FIGURES = ("reconstructions", "samples", "traversals", "interpolations", "latent_scatter", "kl_per_dim")
RUN_FIGURES = (*(f"{name}.png" for name in RUN_FIGURES), "training_curves.png")


def sweep_runs(root: Path):
    """The sweep's parent runs and the nested child runs, from the project's MLflow store."""
    runs = all_runs(root)
    parents = [r for r in runs if r.data.tags.get("vaelab.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_rows(path: Path) -> list[str]:
    """The body rows of the Markdown table in `path` (header and separator left out)."""
    return [line for line in path.read_text().splitlines() if line.startswith("|")][2:]


@pytest.mark.subprocess
def test_a_grid_sweep_nests_every_job_under_one_parent_and_summarises_them(project: Path, tmp_path: Path):
    # 2 x 2 x 2: latent size x beta x seed, run one after another (Hydra's basic launcher).
    sweep = ("model.latent_dim=2,4", "objective.beta=1,4", "seed=0,1")
    done = run_entry("train.py", "-m", *ONE_EPOCH, *sweep, root=project)

    parents, children = sweep_runs(project)
    assert len(parents) == 1
    parent = parents[0]
    parent_id = parent.info.run_id
    assert len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["vaelab.stage"] == "sweep"
    assert "objective.beta=1,4" in parent.data.tags["vaelab.overrides"]
    assert parent.data.tags["vaelab.sweep_axes"] == "model.latent_dim,objective.beta,seed"
    assert sorted(int(c.data.tags["vaelab.sweep_job"]) for c in children) == list(range(8))

    # One summary row per job, with the metrics of the job's best checkpoint, as CSV and Markdown.
    folder = project / "outputs" / parent_id
    rows = read_csv(folder / "summary.csv")
    assert len(rows) == 8 == len(markdown_rows(folder / "summary.md"))
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    best_elbo = {c.info.run_id: c.data.metrics["best/val/elbo"] for c in children}
    for row in rows:
        assert row["status"] == "FINISHED"
        assert float(row["val/elbo"]) == pytest.approx(best_elbo[row["run_id"]])
        assert float(row["val/nll_iw"]) > 0 and float(row["val/rec"]) > 0 and float(row["val/kl"]) >= 0
        assert row["best_epoch"] == "0.0"
    assert {(r["model.latent_dim"], r["objective.beta"], r["seed"]) for r in rows} == set(
        itertools.product(["2", "4"], ["1", "4"], ["0", "1"])
    )

    # Seeds are aggregated per configuration: mean and sample std of the two seeds.
    aggregated = read_csv(folder / "aggregate.csv")
    assert len(aggregated) == 4 == len(markdown_rows(folder / "aggregate.md"))
    for entry in aggregated:
        assert (entry["finished"], entry["jobs"]) == ("2", "2")
        seeds = [
            float(r["val/elbo"])
            for r in rows
            if (r["model.latent_dim"], r["objective.beta"]) == (entry["model.latent_dim"], entry["objective.beta"])
        ]
        assert float(entry["val/elbo mean"]) == pytest.approx(statistics.fmean(seeds))
        assert float(entry["val/elbo std"]) == pytest.approx(statistics.stdev(seeds))
    assert "±" in (folder / "aggregate.md").read_text()

    # Plots: val/elbo per swept axis, and (beta was swept) rate against distortion.
    for name in ("val_elbo_by_axis.png", "rate_distortion.png"):
        assert (folder / name).read_bytes().startswith(PNG_SIGNATURE)
    logged = artifact_paths(mlflow_client(project), parent_id, "summary")
    assert logged == {f"summary/{f}" for f in SUMMARY_FILES | {"aggregate.csv", "aggregate.md", "rate_distortion.png"}}

    # The best job is chosen by val/elbo (validation), and recorded on the parent.
    best = max(rows, key=lambda r: float(r["val/elbo"]))
    assert parent.data.tags["vaelab.best_run_id"] == best["run_id"]
    assert parent.data.metrics["best/val/elbo"] == pytest.approx(float(best["val/elbo"]))
    assert "vaelab.best_config" in parent.data.tags

    # The console ends with a short table; Hydra's sweep folder points at the runs.
    assert "Sweep summary: 8 jobs, 0 failed" in done.stdout
    assert best["run_id"] in done.stdout.split("Sweep summary")[1]
    sweep_dir = Path(parent.data.tags["vaelab.sweep_dir"])
    assert sweep_dir.parent == project / "outputs" / "multirun"
    assert (sweep_dir / "parent_run_id").read_text().strip() == parent_id
    assert {(sweep_dir / str(n) / "run_id").read_text().strip() for n in range(8)} == {r["run_id"] for r in rows}

    # Each job keeps all a single run keeps: its params, config, checkpoint, figures, timings and a model that loads.
    client = mlflow_client(project)
    images = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    swept_params = {tuple(c.data.params[k] for k in ("model.latent_dim", "objective.beta", "seed")) for c in children}
    assert swept_params == set(itertools.product(["2", "4"], ["1", "4"], ["0", "1"]))
    for child in children:
        logged = artifact_paths(client, child.info.run_id)
        assert {"config/config.yaml", "checkpoints/best.ckpt", *(f"figures/{name}" for name in RUN_FIGURES)} <= logged
        assert child.data.metrics["time/fit_s"] > 0 and child.data.metrics["time/figures_s"] > 0
        model = mlflow.pyfunc.load_model(client.download_artifacts(child.info.run_id, "model", str(tmp_path)))
        latent_dim = int(child.data.params["model.latent_dim"])
        assert model.predict(images).shape == (3, latent_dim)
        shutil.rmtree(tmp_path / "model")

    # Sweep jobs publish nothing shared: models/latest/ and metrics/ belong to single runs (DVC's train stage).
    assert not (project / "models" / "latest").exists()
    assert not (project / "metrics" / "train.json").exists()


@pytest.mark.subprocess
def test_a_parallel_sweep_survives_failing_jobs_and_exits_non_zero(project: Path):
    # joblib, 2 worker processes. lr = 1e30 makes the loss NaN; latent_dim=0 is an invalid config.
    done = run_entry(
        "train.py",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *ONE_EPOCH,
        "model.latent_dim=4,0",
        "optim.lr=1e-3,1e30",
        root=project,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    for trouble in ("database is locked", "OperationalError", "IntegrityError", "already exists", "Traceback"):
        assert trouble not in output

    parents, children = sweep_runs(project)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["vaelab.launcher"] == "joblib"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    jobs = {int(c.data.tags["vaelab.sweep_job"]): c for c in children}
    assert jobs[0].info.status == "FINISHED"
    assert jobs[1].info.status == "FAILED"
    assert jobs[1].data.tags["vaelab.failure"].startswith("NonFiniteLossError")
    for invalid in (jobs[2], jobs[3]):  # rejected before training, still a FAILED child run with its params
        assert invalid.info.status == "FAILED"
        assert invalid.data.tags["vaelab.failure"].startswith("ConfigError: model.latent_dim=0")
        assert invalid.data.params["model.latent_dim"] == "0"

    folder = project / "outputs" / parent.info.run_id
    rows = {int(r["job"]): r for r in read_csv(folder / "summary.csv")}
    assert [rows[n]["status"] for n in range(4)] == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    assert math.isfinite(float(rows[0]["val/elbo"])) and rows[1]["val/elbo"] == ""
    assert "NonFiniteLossError" in rows[1]["failure"] and "ConfigError" in rows[2]["failure"]
    assert {p.name for p in folder.iterdir()} == SUMMARY_FILES  # no seeds, no beta axis: no aggregate, no R-D plot
    assert parent.data.tags["vaelab.best_run_id"] == rows[0]["run_id"]
    assert "3 of 4 sweep jobs failed" in done.stderr
    assert "FAILED: ConfigError: model.latent_dim=0" in done.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("swept", "named"),
    [
        # the bad option comes second
        (["arch=mlp,nope"], "arch='nope': allowed one of ['conv', 'mlp', 'mlp2', 'resnet']"),
        (["model.latnt_dim=2,4"], "model.latnt_dim='2': allowed nowhere: model has no key latnt_dim"),
        (["objective.beta=1,4", "objective=iwae,elbo"], "objective.beta='1': allowed nowhere: objective has no key"),
    ],
    ids=["unknown-option", "unknown-key", "key-of-another-option"],
)
def test_a_swept_value_that_does_not_compose_stops_the_sweep_before_its_parent_run(project: Path, swept, named):
    done = run_entry("train.py", "-m", *ONE_EPOCH, *swept, root=project, check=False)

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert named in done.stderr
    assert not (project / "mlflow.db").exists() or all_runs(project) == []  # no parent, and no job ran


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_named_sweep_composes_into_sweeper_params(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"sweep={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and all(isinstance(v, str) and "," in v for v in params.values())
    assert problems(make_config(*(f"{key}={values.split(',')[0]}" for key, values in params.items()))) == []


def job(num: int, status: str = "FINISHED", elbo: float = math.nan, **overrides: str) -> dict:
    return {
        "job": num,
        "overrides": {"data": "digits", **overrides},
        "status": status,
        **{m: elbo for m in ("val/elbo", "val/nll_iw", "val/rec", "val/kl", "best_epoch")},
        "run_id": f"run{num}",
        "failure": "",
    }


def test_a_sweep_composes_each_job_once_as_it_launches_it_after_the_callback_checked_every_swept_value():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["sweep=beta"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.vaelab_sweeper.checked_sweeper.CheckedSweeper"
    assert cfg.hydra.sweeper.params == {"objective.beta": "0.25,0.5,1,2,4,8"}  # sweeps read as with Hydra's own


def test_seeds_aggregate_to_mean_and_std_per_configuration_and_failures_are_counted():
    rows = [
        job(0, elbo=-10.0, beta="1", seed="0"),
        job(1, elbo=-12.0, beta="1", seed="1"),
        job(2, elbo=-20.0, beta="4", seed="0"),
        job(3, "FAILED", beta="4", seed="1"),
    ]
    assert swept_axes(rows) == ["beta", "seed"]  # data=digits is the same in every job
    by_beta = {entry["config"]["beta"]: entry for entry in aggregate(rows, ["beta", "seed"])}
    assert by_beta["1"]["val/elbo mean"] == -11.0 and by_beta["1"]["val/elbo std"] == pytest.approx(math.sqrt(2))
    assert (by_beta["4"]["finished"], by_beta["4"]["jobs"]) == (1, 2)
    assert math.isnan(by_beta["4"]["val/elbo std"])  # one seed: no spread to report
    summary = Summary(rows, Path("unused"))
    assert summary.best["job"] == 0 and [r["job"] for r in summary.failed] == [3]
    assert summary.best_config["config"] == {"beta": "1"}
    assert aggregate(rows, ["beta"]) == []  # no seed axis: nothing to aggregate


def test_the_first_job_of_a_sweep_that_fails_before_its_run_exists_finds_no_child_run(tmp_path: Path):
    # A config error stops a job before train() creates its run; with no child under the parent yet, the job is
    # recorded as a FAILED child of its own rather than lost (vaelab.sweep.jobs.record_failure).
    import mlflow

    from vaelab.sweep.runs import find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("sweep")).info.run_id
    assert find_child(uri, parent, "objective.beta=4", since_ms=0) is None
