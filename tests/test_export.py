"""The trained VAE as an MLflow model: logged with a signature, loadable in a fresh process, registrable."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.config import TINY, make_config
from helpers.processes import subprocess_env
from helpers.stores import mlflow_client
from vaelab.stages.train import train

pytestmark = pytest.mark.subprocess

LOAD_AND_ENCODE = """
import json, sys, mlflow, numpy as np
model = mlflow.pyfunc.load_model(f"runs:/{sys.argv[1]}/model")
images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
codes = model.predict(images)
vae = model.get_raw_model()
print(json.dumps({
    "codes": codes.tolist(),
    "again": model.predict(images).tolist(),
    "decoded": list(vae.decode(codes).shape),
    "samples": list(vae.sample(3).shape),
    "inputs": model.metadata.get_input_schema().to_dict(),
}))
"""


def test_the_model_loads_and_encodes_in_a_fresh_process_and_is_registered(project: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a tiny run lasts a few seconds
    summary = train(make_config(*TINY, "tracking.register_as=digits-vae"))
    run_id = summary["run_id"]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_ENCODE, run_id],
        env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    codes = np.array(out["codes"])
    assert codes.shape == (5, 4) and np.isfinite(codes).all()
    assert out["again"] == out["codes"]  # the same image always gets the same code
    assert out["decoded"] == [5, 1, 8, 8] and out["samples"] == [3, 1, 8, 8]
    assert out["inputs"][0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]

    client = mlflow_client(project)
    [version] = client.search_model_versions("name='digits-vae'")
    assert (
        version.run_id == run_id
        and version.tags["vaelab.data_hash"] == client.get_run(run_id).data.tags["vaelab.data_hash"]
    )
    system = [key for key in client.get_run(run_id).data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
