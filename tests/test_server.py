"""Server mode: logger=mlflow_server logs to a real `mlflow server`; an unreachable one fails fast and plainly."""

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers.config import TINY, make_config
from helpers.processes import free_port, run_entry
from vaelab.config import problems


@pytest.mark.subprocess
def test_training_logs_to_a_running_server_with_artifacts_in_its_store(project: Path, mlflow_server):
    uri, store = mlflow_server
    run_entry("train.py", *TINY, "logger=mlflow_server", f"tracking.uri={uri}", root=project)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("vaelab").experiment_id])
    assert run.info.status == "FINISHED" and "val/elbo" in run.data.metrics
    assert any((store / "artifacts").rglob("best.ckpt")), "artifacts must land in the server's store"
    assert not (project / "mlflow.db").exists()  # nothing went to the local store


@pytest.mark.subprocess
def test_an_unreachable_server_fails_before_training_naming_the_uri(project: Path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = run_entry("train.py", *TINY, "logger=mlflow_server", f"tracking.uri={uri}", root=project, check=False)
    assert done.returncode == 2
    assert f"the MLflow tracking server at {uri} cannot be reached" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60  # no minutes of client retries
    assert not (project / "outputs").exists() and not (project / "mlflow.db").exists()


def test_server_mode_needs_a_server_uri():
    found = problems(make_config("logger=mlflow_server"))
    assert found == [("tracking.uri", None, "an http:// or https:// server URI when logger=mlflow_server")]
