"""The fault matrix (docs/faults.md):
the rows about a single training run: each fault ends with a clear message, the right
MLflow state and nothing lost. (Config, data, search, checkpoint and DVC rows live beside the code they test.)"""

import re
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers.config import SIGNAL_EPOCHS, SIGNALLABLE, TINY, make_config
from helpers.filesystems import tmpfs
from helpers.processes import run_entry, signal_after_first_checkpoint, start_training
from helpers.stores import all_runs, mlflow_client
from vaelab.errors import INTERRUPTED_EXIT
from vaelab.tracking.run import Run
from vaelab.tracking.store import ensure_experiment


@pytest.mark.subprocess
def test_ctrl_c_saves_a_checkpoint_marks_the_run_killed_exits_cleanly_and_resumes(project: Path):
    log = project / "train.log"
    process = start_training(project, *SIGNALLABLE, log=log)
    last = signal_after_first_checkpoint(process, project, signal.SIGINT)
    output = log.read_text()

    assert process.returncode == INTERRUPTED_EXIT, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [run] = all_runs(project)
    run_id = run.info.run_id
    assert f"resume={run_id}" in output  # the message says how to go on
    assert run.info.status == "KILLED"
    assert run.data.tags["vaelab.failure"] == "interrupted (Ctrl-C or SIGTERM)"
    interrupted = Path(run.data.tags["vaelab.interrupted_checkpoint"])
    assert interrupted == last.parent / "interrupted.ckpt"
    state = torch.load(interrupted, map_location="cpu", weights_only=True)  # complete and loadable
    assert state["vaelab"]["run_id"] == run_id and state["state_dict"]
    complete = torch.load(last, map_location="cpu", weights_only=True)
    assert complete["epoch"] < SIGNAL_EPOCHS - 1, "the interrupt came too late to test anything"

    run_entry("train.py", f"resume={run_id}", root=project)

    [resumed] = all_runs(project)
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client(project).get_metric_history(run_id, "val/elbo")]
    assert len(steps) == len(set(steps)) == SIGNAL_EPOCHS  # every epoch once: none lost, none repeated
    assert not interrupted.exists()  # the finished run cleared its stale interrupt state


@pytest.mark.subprocess
def test_a_read_only_output_folder_fails_before_the_run_naming_the_folder(project: Path):
    with tmpfs(project / "outputs", "ro,size=1m"):
        done = run_entry("train.py", *TINY, root=project, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"cannot write {project / 'outputs'}: the filesystem is read-only" in done.stderr
    assert not (project / "mlflow.db").exists() or all_runs(project) == []  # no run was started


@pytest.mark.subprocess
def test_a_file_in_the_way_of_an_output_folder_is_named(project: Path):
    (project / "metrics").write_text("not a folder")
    done = run_entry("train.py", *TINY, "publish=true", root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot write {project / 'metrics'}" in done.stderr
    assert not (project / "mlflow.db").exists() or all_runs(project) == []


@pytest.mark.subprocess
def test_a_full_disk_fails_the_run_naming_the_file_and_leaves_no_partial_checkpoint(project: Path):
    # 64 KiB: the run's config.yaml fits, its first checkpoint (~110 KB with Adam's moments) does not.
    with tmpfs(project / "outputs", "size=64k"):
        done = run_entry("train.py", *TINY, root=project, check=False)
        checkpoints = list((project / "outputs").glob("*/checkpoints/*"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"cannot write \S+/checkpoints/\S+\.ckpt: the disk is full", done.stderr), done.stderr[-2000:]
    assert checkpoints == []  # no half-written file left to be mistaken for a checkpoint
    [run] = all_runs(project)
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags["vaelab.failure"]


@contextmanager
def store_locked(db: Path, seconds: float | None = None) -> Iterator[None]:
    """Another writer holding the sqlite store's exclusive lock, for `seconds` or for the whole block."""
    connection = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(seconds, connection.rollback) if seconds is not None else None
    if release:
        release.start()
    try:
        yield
    finally:
        if release:
            release.join()
        if connection.in_transaction:
            connection.rollback()
        connection.close()


def store_is_intact(db: Path) -> bool:
    with sqlite3.connect(db) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.subprocess
def test_training_waits_out_a_briefly_locked_store(project: Path):
    ensure_experiment(f"sqlite:///{project / 'mlflow.db'}", "vaelab")  # the store exists, as after earlier runs
    # 15 s: the process reaches the store within ~5 s of starting, and sqlite's own busy wait gives up after 5 s
    # more; only vaelab's retries get the run through the rest.
    with store_locked(project / "mlflow.db", seconds=15):
        run_entry("train.py", *TINY, "trainer.max_epochs=1", root=project)
    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    assert store_is_intact(project / "mlflow.db")


@pytest.mark.subprocess
def test_a_store_locked_for_too_long_fails_clearly_before_the_run_and_stays_intact(project: Path):
    db = project / "mlflow.db"
    ensure_experiment(f"sqlite:///{db}", "vaelab")
    with store_locked(db):
        done = run_entry("train.py", *TINY, "tracking.lock_timeout_s=1", root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"the MLflow store sqlite:///{db} stayed locked by another process" in done.stderr
    assert store_is_intact(db)
    assert all_runs(project) == []  # nothing half-created


def test_a_new_store_is_a_copy_of_the_empty_store_this_mlflow_made_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = (tmp_path / name / "mlflow.db" for name in ("first", "second"))
    first.parent.mkdir(), second.parent.mkdir()
    ensure_experiment(f"sqlite:///{first}", "vaelab")
    [empty] = (tmp_path / "cache" / "vaelab").glob("empty-mlflow-store-*.db")
    made = empty.stat().st_mtime_ns
    ensure_experiment(f"sqlite:///{second}", "vaelab")

    assert empty.stat().st_mtime_ns == made  # made once, copied since
    for db in (first, second):
        experiments = {e.name: e.artifact_location for e in MlflowClient(f"sqlite:///{db}").search_experiments()}
        assert experiments["vaelab"] == (db.parent / "mlartifacts" / "vaelab").as_uri()
        assert set(experiments) == {"Default", "vaelab"}  # MLflow's own Default, made when the copy was opened
        assert store_is_intact(db)


def test_where_the_cache_cannot_be_written_mlflow_makes_the_new_store_itself(tmp_path: Path, monkeypatch):
    (tmp_path / "not a folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not a folder"))
    db = tmp_path / "mlflow.db"
    ensure_experiment(f"sqlite:///{db}", "vaelab")
    assert {e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()} == {"Default", "vaelab"}
    assert store_is_intact(db)


@pytest.mark.subprocess
def test_concurrent_first_use_of_a_new_store_creates_it_once(project: Path):
    starts = [start_training(project, *TINY, "trainer.max_epochs=1", f"seed={seed}") for seed in range(2)]
    assert [process.wait(timeout=300) for process in starts] == [0, 0]
    runs = all_runs(project)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1  # one experiment, not one per racing process
    assert store_is_intact(project / "mlflow.db")


def test_secrets_and_environment_values_never_reach_params_or_tags(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAELAB_TEST_SECRET_PATH", "/home/alice/very-private")
    overrides = ["+db.password=hunter2", "+tracking.api_token=abc123xyz", "+store.Secret_Key=k3y-s3cr3t"]
    cfg = make_config(
        *TINY,
        *overrides,
        "+extra.path=${oc.env:VAELAB_TEST_SECRET_PATH}",
        "+extra.copy=${extra.path}",  # through another key: still the environment's value
    )
    run = Run.create(cfg, "train", overrides=[*overrides, "objective.beta=2"], tags={})
    logged = mlflow_client(project).get_run(run.run_id).data

    assert logged.params["db.password"] == logged.params["tracking.api_token"] == "***"
    assert logged.params["store.Secret_Key"] == "***"
    assert logged.params["extra.path"] == "${oc.env:VAELAB_TEST_SECRET_PATH}"
    assert logged.params["extra.copy"] == "${extra.path}"
    assert logged.params["model.latent_dim"] == "4"  # everything else as usual
    recorded = " ".join([*logged.params.values(), *logged.tags.values()])
    for secret in ("hunter2", "abc123xyz", "k3y-s3cr3t", "/home/alice/very-private"):
        assert secret not in recorded, secret
    overrides_tag = logged.tags["vaelab.overrides"]
    assert "+db.password=***" in overrides_tag and "objective.beta=2" in overrides_tag
