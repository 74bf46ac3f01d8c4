"""The shared services of a cluster, for real: a PostgreSQL server holds the Optuna study and an MLflow tracking
server's backend store; two search commands (`pipelines/train.py -m hydra/sweeper=optuna` processes) share both.

A PostgreSQL server is started in a temporary directory with `initdb` and `pg_ctl`, on 127.0.0.1 at a free port, as
an unprivileged user (initdb refuses root: as root, it runs as `postgres` through `runuser`). Where PostgreSQL is
missing, the test installs Debian's `postgresql` with apt-get when it runs as root, and is skipped otherwise.
Everything it starts is stopped by PID.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers.config import REPO, TINY_TRIAL
from helpers.processes import free_port, running_mlflow_server, subprocess_env
from vaelab.search.study import WORKER_ATTR
from vaelab.search.workers import PARENT_ATTR
from vaelab.tracking.run import PARENT_TAG

pytestmark = pytest.mark.subprocess

pytestmark = pytest.mark.slow

PG_USER = "vaelab"  # the database superuser initdb creates (trust authentication, loopback only)
N_TRIALS = 4

# Tiny trials (scikit-learn's digits, one epoch, a small MLP), one sampled value, no pruning.
SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    *TINY_TRIAL,
    "objective.beta=interval(0.5,2)",
    "hydra/sweeper/sampler=random",
    "hydra/sweeper/pruner=none",
    f"hydra.sweeper.n_trials={N_TRIALS}",
    "hydra.sweeper.sampler.seed=0",
    "hydra.sweeper.study_name=on_postgres",
]


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def install_postgres() -> Path:
    """initdb's folder, installing Debian's postgresql first where it is missing and we may (root, apt-get)."""
    if postgres_bin() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            subprocess.run(command, env=env, capture_output=True, timeout=600)
    found = postgres_bin()
    if found is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed: apt-get install postgresql (as root) to run this")
    return found


def as_unprivileged(command: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as the `postgres` user."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def running_postgres(log: Path) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 at a free port, in its own temporary folder; yields
    `postgresql+psycopg://vaelab@127.0.0.1:<port>` (append /<database>). Stopped by its postmaster's PID."""
    bin_dir = install_postgres()
    folder = Path(tempfile.mkdtemp(prefix="vaelab-pg-"))  # not under pytest's tmp_path, which only root may enter
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run(as_unprivileged(list(command)), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    pid = None
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        server_options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder}"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", server_options, "-l", str(folder / "server.log"),
            "-w", "-t", "60", "start")  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}"
    finally:
        if pid is not None:
            stop(pid)
        if (folder / "server.log").exists():
            shutil.copy(folder / "server.log", log)
        shutil.rmtree(folder, ignore_errors=True)


def stop(pid: int, timeout: float = 60) -> None:
    """PostgreSQL's fast shutdown (SIGINT to the postmaster), then SIGKILL if it has not ended in `timeout` s."""
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def create_databases(server: str, *names: str) -> None:
    import psycopg

    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as db:
        for name in names:
            db.execute(f'CREATE DATABASE "{name}"')


def count_rows(url: str, query: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as db:
        return db.execute(query).fetchone()[0]


def start_worker(project: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / "train.py"), *overrides],
            cwd=project,
            env=subprocess_env(VAELAB_ROOT=str(project)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_all(workers: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [worker.wait(timeout=max(1.0, deadline - time.monotonic())) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_two_search_workers_share_a_postgres_study_and_an_mlflow_server_on_postgres(project: Path, tmp_path: Path):
    with running_postgres(tmp_path / "postgres.log") as server:
        create_databases(server, "optuna", "mlflow")
        optuna_url, mlflow_url = f"{server}/optuna", f"{server}/mlflow"
        artifacts = tmp_path / "artifacts"
        with running_mlflow_server(mlflow_url, artifacts, tmp_path / "mlflow.log") as tracking_uri:
            command = [
                *SEARCH,
                f"hydra.sweeper.storage={optuna_url}",
                "logger=mlflow_server",
                f"tracking.uri={tracking_uri}",
            ]
            logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
            codes = wait_all([start_worker(project, command, log) for log in logs])
            outputs = [log.read_text() for log in logs]
            for code, output in zip(codes, outputs, strict=True):
                assert code == 0, output[-4000:]
                assert "Traceback" not in output, output[-4000:]

            # Optuna: exactly n_trials, all COMPLETE, run by both workers, in the PostgreSQL database.
            study = optuna.load_study(study_name="on_postgres", storage=optuna_url)
            assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * N_TRIALS
            assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) == 2
            assert count_rows(optuna_url, "SELECT count(*) FROM trials") == N_TRIALS

            # MLflow, through the server: one parent run both workers joined, one FINISHED child run per trial.
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments)
            [parent] = [run for run in runs if run.data.tags.get("vaelab.kind") == "search"]
            assert parent.info.status == "FINISHED" and study.user_attrs[PARENT_ATTR] == parent.info.run_id
            assert parent.data.tags["vaelab.workers"] == "2"
            assert parent.data.metrics["search/complete"] == N_TRIALS
            children = {run.info.run_id: run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id}
            assert set(children) == {trial.user_attrs["mlflow_run_id"] for trial in study.trials}
            assert {run.info.status for run in children.values()} == {"FINISHED"}
            assert len(runs) == N_TRIALS + 1

            # The server keeps runs in PostgreSQL and artifacts in its artifact store.
            assert count_rows(mlflow_url, "SELECT count(*) FROM runs") == N_TRIALS + 1
            for run_id in children:
                assert any(artifacts.rglob(f"{run_id}/artifacts/*")), f"no artifacts of run {run_id} in {artifacts}"
            assert not (project / "mlflow.db").exists() and not (project / "optuna.db").exists()
