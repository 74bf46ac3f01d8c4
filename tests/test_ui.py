"""`make ui`: the MLflow UI on a project's store, one worker, each experiment's runs-table link printed first, and
no framework deprecation warning on the console."""

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.config import REPO
from helpers.processes import free_port, subprocess_env
from vaelab.tracking.store import ensure_experiment


@pytest.mark.subprocess
def test_make_ui_serves_the_store_with_one_quiet_worker_and_prints_each_experiments_link(tmp_path: Path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment(store, "vaelab")
    MlflowClient(store).create_run(experiment)
    port = free_port()
    server = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "ui", f"UI_STORE={store}", f"UI_PORT={port}"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make and the server in a group of their own, stopped together below
    )
    try:
        answered, deadline = False, time.monotonic() + 90
        while time.monotonic() < deadline and not answered:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    answered = response.status == 200
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(1)
        assert answered, "the UI never answered"
        time.sleep(2)  # every worker it starts has started by now
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        console = server.communicate(timeout=30)[0].decode()

    link = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert link in console, console[-3000:]
    assert console.count("Started server process") == 1, console[-3000:]  # one worker, not MLflow's four
    assert "Deprecat" not in console and "deprecat" not in console, console[-3000:]
