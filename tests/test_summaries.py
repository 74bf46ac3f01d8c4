"""Summaries tell the truth: a sweep's summary lists every job Hydra launched, counts a job whose MLflow run is missing
or was deleted as failed (named so) and picks its best job among finished ones only; a search refuses a study storage
that is another tool's database before writing anything into it."""

from __future__ import annotations

import csv
import os
import sqlite3
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from helpers.config import CONF, TINY_TRIAL
from helpers.processes import run_entry, subprocess_env
from helpers.stores import all_runs, mlflow_client
from vaelab.errors import ConfigError
from vaelab.search.driver import search

TESTS = Path(__file__).resolve().parent
# A tiny search: one sampled value, tiny trials.
SEARCH = [*TINY_TRIAL, "objective.beta=interval(0.5,2)"]


# -- Sweeps ------------------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_sweep(client, root: Path, statuses: dict[int, str], elbo: dict[int, float]) -> tuple[str, dict[int, str]]:
    """A parent run and one child run per job, as a sweep leaves them: their job tags, status and best metrics."""
    experiment = client.create_experiment("sweep", artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(experiment, tags={"vaelab.kind": "sweep"}).info.run_id
    children = {}
    for num, status in statuses.items():
        tags = {"mlflow.parentRunId": parent, "vaelab.sweep_job": str(num), "vaelab.job_overrides": f'["seed={num}"]'}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        if status == "FINISHED":
            for name in ("val/elbo", "val/nll_iw", "val/rec", "val/kl", "epoch"):
                client.log_metric(run_id, f"best/{name}", elbo[num])
        client.set_terminated(run_id, status)
        children[num] = run_id
    return parent, children


def test_a_job_whose_run_was_deleted_or_never_found_is_a_failed_job_and_never_the_best(project: Path):
    from vaelab.sweep.summary import summarize
    from vaelab.tracking.run import Run

    client = mlflow_client(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    parent, children = make_sweep(client, project, {0: "FINISHED", 1: "FINISHED", 2: "FAILED"}, {0: -90.0, 1: -80.0})
    client.delete_run(children[1])  # the best job's run, deleted while the sweep ran
    launched = [[f"seed={n}"] for n in range(4)]  # job 3 left no run at all
    summary = summarize(Run(uri, parent, "sweep"), project / "summary", launched, {3: "f" * 32})

    assert [(row["job"], row["status"]) for row in summary.rows] == [
        (0, "FINISHED"),
        (1, "DELETED"),
        (2, "FAILED"),
        (3, "MISSING"),
    ]
    assert [row["job"] for row in summary.failed] == [1, 2, 3]
    assert summary.best["job"] == 0
    assert summary.rows[1]["failure"] == "its MLflow run was deleted"
    assert summary.rows[3]["run_id"] == "f" * 32 and "no MLflow run" in summary.rows[3]["failure"]
    assert "Sweep summary: 4 jobs, 3 failed" in summary.console()
    table = read_csv(project / "summary" / "summary.csv")
    assert [row["status"] for row in table] == ["FINISHED", "DELETED", "FAILED", "MISSING"]
    ended = client.get_run(parent)
    assert ended.info.status == "FAILED" and ended.data.tags["vaelab.best_run_id"] == children[0]
    assert ended.data.tags["vaelab.jobs_failed"] == "3"


def test_the_jobs_hydra_launches_are_known_from_the_sweepers_params_and_the_command_line():
    from vaelab.sweep.runs import launched_jobs

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["sweep=seeds"], return_hydra_config=True)
    jobs = launched_jobs(cfg.hydra.sweeper, ["model.latent_dim=2,4", "data=digits"])  # seeds 0,1,2 x 2 sizes
    assert jobs == [
        [f"seed={seed}", f"model.latent_dim={size}", "data=digits"] for seed in (0, 1, 2) for size in (2, 4)
    ]
    assert launched_jobs({"_target_": "some.OtherSweeper"}, ["seed=0,1"]) is None


class DeleteFinishedSiblings(Callback):
    """As a job starts fitting, delete the runs of the sweep's jobs that finished before it (a person cleaning up
    the MLflow UI while the sweep runs)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{Path(os.environ['VAELAB_ROOT']) / 'mlflow.db'}")
        parent = os.environ["VAELAB_SWEEP_RUN_ID"]
        experiments = [e.experiment_id for e in client.search_experiments()]
        query = f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'"
        for run in client.search_runs(experiments, filter_string=query):
            client.delete_run(run.info.run_id)


@pytest.mark.subprocess
def test_a_sweep_whose_finished_job_run_was_deleted_reports_it_failed_and_exits_1(project: Path):
    import subprocess
    import sys

    from helpers.config import REPO

    callback = "+callbacks.cleanup={_target_:test_summaries.DeleteFinishedSiblings}"
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), "-m", *TINY_TRIAL, "seed=0,1", callback],
        cwd=project,
        env=subprocess_env(VAELAB_ROOT=str(project), PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Sweep summary: 2 jobs, 1 failed" in done.stdout
    assert "1 of 2 sweep jobs failed (job 0)" in done.stderr
    [parent] = [r for r in all_runs(project) if r.data.tags.get("vaelab.kind") == "sweep"]
    rows = read_csv(project / "outputs" / parent.info.run_id / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "DELETED"), ("1", "FINISHED")]
    assert parent.info.status == "FAILED" and parent.data.tags["vaelab.best_run_id"] == rows[1]["run_id"]


# -- Search storage ----------------------------------------------------------------------------------------------


def mlflow_store(path: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates MLflow's schema


def one_unrelated_table(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('mine')")


def not_a_database(path: Path) -> None:
    path.write_text("a text file, not a database\n" * 100)


def tables(path: Path) -> set[str]:
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize("foreign", [mlflow_store, one_unrelated_table, not_a_database], ids=lambda f: f.__name__)
def test_a_search_refuses_a_storage_that_is_another_tools_database_before_writing_into_it(
    project: Path, foreign, capsys
):
    path = project / f"{foreign.__name__}.db"
    foreign(path)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as refusal:
        search([*SEARCH, f"hydra.sweeper.storage=sqlite:///{path}"], CONF)
    assert refusal.value.code == 2
    message = capsys.readouterr().err
    assert "hydra.sweeper.storage=" in message and str(path) in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == [path.name]  # not even a lock file beside it


def test_an_empty_file_or_optunas_own_database_is_a_fine_storage(tmp_path: Path):
    from vaelab.search.config import Settings
    from vaelab.search.study import check_storage_is_optunas

    def settings(path: Path) -> Settings:
        return Settings(
            name="command line",
            study_name="s",
            storage=f"sqlite:///{path}",
            n_trials=1,
            n_jobs=None,
            metric="val/elbo",
            direction="maximize",
            sampler={"_target_": "optuna.samplers.TPESampler"},
            pruner={"_target_": "optuna.pruners.NopPruner"},
            space={},
            heartbeat_interval=1,
            grace_period=2,
            max_retry=0,
        )

    empty = tmp_path / "empty.db"
    empty.touch()
    check_storage_is_optunas(settings(empty))
    check_storage_is_optunas(settings(tmp_path / "new.db"))
    own = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{own}", study_name="s")
    check_storage_is_optunas(settings(own))
    assert "studies" in tables(own) and not (tmp_path / "new.db").exists()
    one_unrelated_table(own)
    with pytest.raises(ConfigError, match="holds other tables \\(notes\\)"):
        check_storage_is_optunas(settings(own))


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_search_from_the_command_line_refuses_mlflows_database_in_one_message(project: Path):
    mlflow_store(project / "mlflow.db")
    before = tables(project / "mlflow.db")
    storage = f"hydra.sweeper.storage=sqlite:///{project / 'mlflow.db'}"
    done = run_entry("train.py", "-m", "hydra/sweeper=optuna", *SEARCH, storage, root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "hydra.sweeper.storage=" in done.stderr and "holds other tables" in done.stderr
    assert tables(project / "mlflow.db") == before and "studies" not in before
