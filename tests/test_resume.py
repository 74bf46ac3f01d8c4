"""Resume: a run SIGKILLed mid-training continues from its last checkpoint, in the same MLflow run."""

import signal
from pathlib import Path

import pytest
import torch

from helpers.config import SIGNAL_EPOCHS, SIGNALLABLE, TINY, make_config
from helpers.processes import run_entry, signal_after_first_checkpoint, start_training
from helpers.stores import all_runs, mlflow_client
from vaelab.errors import ConfigError, VaelabError
from vaelab.stages.evaluate import evaluate
from vaelab.stages.resume import resumption
from vaelab.stages.train import train


@pytest.mark.subprocess
def test_a_sigkilled_run_resumes_in_the_same_mlflow_run(project: Path):
    checkpoint = signal_after_first_checkpoint(
        start_training(project, *SIGNALLABLE, "publish=true"), project, signal.SIGKILL
    )
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_at < SIGNAL_EPOCHS - 1, "the kill came too late to test anything"
    [run] = all_runs(project)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise

    done = run_entry("train.py", "resume=last", root=project)

    assert "val/nll_iw" in done.stdout and "(k=4, " in done.stdout  # the run's own eval.val_iw_k, not the default 16
    [resumed] = all_runs(project)
    run_id = resumed.info.run_id
    assert run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["vaelab.resumes"] == "1"
    assert resumed.data.params == run.data.params  # logged once, never again
    history = mlflow_client(project).get_metric_history(run_id, "val/elbo")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)) == SIGNAL_EPOCHS  # every epoch once: none lost, none repeated
    assert all(-100 < m.value < 0 for m in history)  # nats per 8x8 digit: a normal range
    summary = torch.load(project / "models" / "latest" / "model.ckpt", weights_only=True)
    assert summary["vaelab"]["run_id"] == run_id
    assert (project / "models" / "latest" / "run_id").read_text().strip() == run_id


@pytest.mark.subprocess
def test_resume_refuses_other_overrides_and_unknown_runs(project: Path):
    with pytest.raises(ConfigError, match="no other overrides"):
        resumption(make_config("resume=last"), ["resume=last", "objective.beta=4"])
    with pytest.raises(VaelabError, match="no train run of experiment 'vaelab'"):
        resumption(make_config("resume=last"), ["resume=last"])
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(VaelabError, match=f"cannot resume run {missing}: .*last.ckpt does not exist"):
        resumption(make_config(f"resume={missing}"), [f"resume={missing}"])
    done = run_entry("train.py", "resume=not-a-run", root=project, check=False)
    assert done.returncode == 2 and "resume='not-a-run'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_resume_continues_a_finished_run_with_its_own_config_and_evaluate_finds_it_by_run_id(project: Path):
    """Resuming uses the run's stored config, not the defaults the resume command composes."""
    first = train(make_config(*TINY, "model.latent_dim=3", "publish=true"))
    again = train(make_config(f"resume={first['run_id']}"))
    assert again["run_id"] == first["run_id"]
    assert again["epochs"] == first["epochs"]  # max_epochs was reached already: nothing more to train
    [run] = all_runs(project)
    assert run.info.status == "FINISHED" and run.data.params["model.latent_dim"] == "3"

    (project / "models").rename(project / "elsewhere")  # evaluate must not fall back on models/latest
    metrics = evaluate(make_config(*TINY, f"run_id={first['run_id']}"))
    assert metrics["run_id"] == first["run_id"]
    assert "test/nll_iw" in mlflow_client(project).get_run(first["run_id"]).data.metrics
