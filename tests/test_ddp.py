"""DDP, tested on the CPU: trainer=ddp_cpu runs 2 gloo processes through the code path trainer=ddp runs on GPUs."""

from pathlib import Path

import pytest

from helpers.config import TINY
from helpers.processes import run_entry
from helpers.stores import all_runs, mlflow_client

pytestmark = pytest.mark.subprocess

EPOCHS = 3
GLOBAL_BATCH = 128


def test_ddp_on_two_processes_makes_one_run_one_checkpoint_and_the_metrics_of_one_process(tmp_path: Path, monkeypatch):
    results = {}
    for name, trainer, per_process_batch in (("ddp", "ddp_cpu", GLOBAL_BATCH // 2), ("single", "cpu", GLOBAL_BATCH)):
        root = tmp_path / name
        root.mkdir()
        monkeypatch.setenv("VAELAB_ROOT", str(root))
        overrides = [f"trainer={trainer}", f"trainer.max_epochs={EPOCHS}", f"data.batch_size={per_process_batch}"]
        overrides.append("publish=true")  # rank zero alone publishes models/latest/
        run_entry("train.py", *TINY, *overrides, root=root)
        [run] = all_runs(root)  # exactly one MLflow run, whatever the number of processes
        assert run.info.status == "FINISHED"
        history = mlflow_client(root).get_metric_history(run.info.run_id, "val/elbo")
        assert len(history) == EPOCHS  # reduced over the ranks and logged once per epoch, not once per rank
        results[name] = (root, run, history[-1].value)

    root, run, ddp_elbo = results["ddp"]
    assert run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    files = (p.relative_to(root).as_posix() for p in root.rglob("*.ckpt"))
    checkpoints = {f for f in files if not f.startswith("mlartifacts/")}  # MLflow's copies aside
    run_dir = f"outputs/{run.info.run_id}"
    # One set, written by rank zero into the run's folder (plus the published copy and the pyfunc model's).
    assert checkpoints == {
        f"{run_dir}/checkpoints/best.ckpt",
        f"{run_dir}/checkpoints/last.ckpt",
        f"{run_dir}/model/data/best.ckpt",
        "models/latest/model.ckpt",
    }
    assert [p.name for p in (root / "outputs").iterdir()] == [run.info.run_id]
    # Two processes of 64 images a step train like one of 128: the same bound within a fraction of a nat.
    single_elbo = results["single"][2]
    assert abs(ddp_elbo - single_elbo) < 1.0, (ddp_elbo, single_elbo)
