"""`make dashboard`: optuna-dashboard serves the searches' study storage on this machine, with the plots each
search's report uploads as study artifacts."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from helpers.config import REPO
from helpers.processes import free_port, subprocess_env


@pytest.mark.subprocess
def test_make_dashboard_serves_the_study_on_loopback_until_stopped(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="served", direction="maximize")
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 2), n_trials=1)
    port = free_port()
    server = subprocess.Popen(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "dashboard",
            f"OPTUNA_STORAGE={storage}",
            f"DASHBOARD_PORT={port}",
            f"OPTUNA_ARTIFACTS={tmp_path / 'artifacts'}",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make and the server in a group of their own, stopped together below
    )
    try:
        summaries = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and summaries is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    summaries = json.load(response)["study_summaries"]
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(1)
        assert summaries is not None, "the dashboard never answered"
        assert [s["study_name"] for s in summaries] == ["served"]
        assert (tmp_path / "artifacts").is_dir()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    with pytest.raises(OSError):  # stopped: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5)
