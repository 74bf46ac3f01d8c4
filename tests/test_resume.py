"""Resume: a run SIGKILLed mid-training continues from its last checkpoint, in the same MLflow run; a finished run
is extended with trainer.max_epochs, or says it has nothing left to do; the console says which run goes on from
where, and a refused resume answers before the heavy imports."""

import signal
from pathlib import Path

import pytest
import torch

from helpers.config import SIGNAL_EPOCHS, SIGNALLABLE, TINY, make_config
from helpers.processes import run_entry, signal_after_first_checkpoint, start_training
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.errors import ConfigError, TrainingInterrupted, VaelabError
from vaelab.stages import train as train_stage
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


def resume_command(monkeypatch: pytest.MonkeyPatch, *overrides: str):
    """The config `python pipelines/train.py <overrides>` composes, with `overrides` as the command line train() reads
    (in-process, Hydra's own record of it is not there)."""
    monkeypatch.setattr(train_stage, "hydra_overrides", lambda: list(overrides))
    return make_config(*overrides)


def imported(stderr: str) -> set[str]:
    """The top-level packages a process imported, from its PYTHONPROFILEIMPORTTIME report."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")
    }


@pytest.mark.integration
def test_trainer_max_epochs_extends_a_finished_run_in_the_same_mlflow_run_with_its_own_config(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """The run's stored config is used (latent_dim=3, not the default), with only max_epochs replaced; Lightning
    goes on from last.ckpt to the new length, and every epoch is logged once."""
    first = train(make_config(*TINY, "model.latent_dim=3"))
    run_id = first["run_id"]
    capsys.readouterr()

    again = train(resume_command(monkeypatch, f"resume={run_id}", "trainer.max_epochs=4"))

    checkpoint = project / "outputs" / run_id / "checkpoints" / "last.ckpt"
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vaelab: resuming")]
    assert said == [f"vaelab: resuming run {run_id} from {checkpoint} (epoch 2 of 4; trainer.max_epochs was 2)"]
    assert again["run_id"] == run_id and again["epochs"] == 4
    [run] = all_runs(project)
    assert run.info.status == "FINISHED" and run.data.params["model.latent_dim"] == "3"
    assert run.data.params["trainer.max_epochs"] == "2"  # MLflow params are written once: the tag has the new length
    assert run.data.tags["vaelab.extended_to"] == "4"
    assert "max_epochs: 4" in (project / "outputs" / run_id / "config.yaml").read_text()
    assert not (project / "models").exists()  # evaluate below finds the run by its id, not in models/latest
    steps = [m.step for m in mlflow_client(project).get_metric_history(run_id, "val/elbo")]
    assert len(steps) == len(set(steps)) == 4 and steps == sorted(steps)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 3  # the 0-based index of the fourth epoch

    metrics = evaluate(make_config(*TINY, f"run_id={run_id}"))
    assert metrics["run_id"] == run_id
    assert "test/nll_iw" in mlflow_client(project).get_run(run_id).data.metrics


@pytest.mark.integration
def test_an_extension_that_would_not_train_on_is_refused_in_one_line_before_the_run_changes(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    """No more epochs than the run has trained, or more than a learning-rate schedule was set for: refused."""
    first = train(make_config(*TINY, "trainer.max_epochs=1", "scheduler=cosine"))
    run_id = first["run_id"]
    [before] = all_runs(project)

    for asked, allowed in [(1, "allowed more than 1, the epochs it has trained already"), (3, r"scheduler.T_max=1")]:
        with pytest.raises(VaelabError, match=f"run {run_id} with trainer.max_epochs={asked}: .*{allowed}") as refused:
            train(resume_command(monkeypatch, f"resume={run_id}", f"trainer.max_epochs={asked}"))
        assert "\n" not in str(refused.value)

    [after] = all_runs(project)
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        before.info.status,
        before.info.end_time,
        before.data.tags,
    )
    assert "max_epochs: 1" in (project / "outputs" / run_id / "config.yaml").read_text()


@pytest.mark.integration
def test_resuming_a_run_that_finished_all_its_epochs_says_so_and_changes_nothing(project: Path, capsys):
    first = train(make_config(*TINY, "publish=true"))
    run_id = first["run_id"]
    [before] = all_runs(project)
    artifacts = artifact_paths(mlflow_client(project), run_id)
    capsys.readouterr()

    again = train(make_config("resume=last"))

    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"vaelab: run {run_id} already finished all its 2 epochs (best epoch {first['best_epoch'] + 1:.0f} of 2: "
        f"val/elbo {first['val/elbo']:.2f}); nothing to resume. `resume={run_id} trainer.max_epochs=<more>` "
        "trains it further"
    ]
    assert again["already_finished"] and again["run_id"] == run_id and again["val/elbo"] == first["val/elbo"]
    [after] = all_runs(project)
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        before.info.status,
        before.info.end_time,
        before.data.tags,
    )
    assert after.data.metrics == before.data.metrics
    assert artifact_paths(mlflow_client(project), run_id) == artifacts

    # A run from before runs kept a summary file: MLflow says its finishing covered every epoch it trained.
    (project / "outputs" / run_id / "train.json").unlink()
    train(make_config("resume=last"))
    assert capsys.readouterr().out.splitlines() == [
        f"vaelab: run {run_id} already finished all its 2 epochs; nothing to resume. "
        f"`resume={run_id} trainer.max_epochs=<more>` trains it further"
    ]
    [after] = all_runs(project)
    assert (after.info.status, after.info.end_time, after.data.metrics) == (
        before.info.status,
        before.info.end_time,
        before.data.metrics,
    )


# Lightning's EarlyStopping, told to stop once val/elbo is above a floor every run clears: it stops after an epoch.
STOP_AT_ONCE = (
    "+callbacks.stop={_target_:lightning.pytorch.callbacks.EarlyStopping,"
    "monitor:'val/elbo',mode:max,stopping_threshold:-1e9}"
)


@pytest.mark.integration
def test_a_run_a_callback_stopped_early_is_finished_and_trainer_max_epochs_trains_it_on(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    first = train(make_config(*TINY, "trainer.max_epochs=3", STOP_AT_ONCE))
    run_id = first["run_id"]
    assert first["epochs"] == 1
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vaelab: training stopped")]
    assert said == [
        "vaelab: training stopped after 1 of its 3 epochs (a callback such as EarlyStopping, or a trainer limit, "
        "ended it)"
    ]
    [before] = all_runs(project)
    assert before.info.status == "FINISHED"
    capsys.readouterr()

    again = train(make_config(f"resume={run_id}"))

    assert capsys.readouterr().out.splitlines() == [
        f"vaelab: run {run_id} already finished: it stopped after 1 of its 3 epochs (a callback or a trainer limit "
        f"ended it) (best epoch 1 of 1: val/elbo {first['val/elbo']:.2f}); nothing to resume. "
        f"`resume={run_id} trainer.max_epochs=<N>` trains it on to N epochs"
    ]
    assert again["already_finished"]
    [after] = all_runs(project)
    assert (after.info.end_time, after.data.metrics) == (before.info.end_time, before.data.metrics)

    # Asked for its own length again, it trains on; its restored EarlyStopping stops it after the next epoch.
    on = train(resume_command(monkeypatch, f"resume={run_id}", "trainer.max_epochs=3"))

    assert on["run_id"] == run_id and on["epochs"] == 2 and "already_finished" not in on
    steps = [m.step for m in mlflow_client(project).get_metric_history(run_id, "val/elbo")]
    assert len(steps) == len(set(steps)) == 2
    [after] = all_runs(project)
    assert after.info.status == "FINISHED" and "vaelab.extended_to" not in after.data.tags


@pytest.mark.subprocess
def test_the_console_of_a_resume_names_the_run_once_and_a_refused_resume_answers_before_the_heavy_imports(
    project: Path,
):
    first = train(make_config(*TINY, "trainer.max_epochs=1"))
    run_id = first["run_id"]
    checkpoint = project / "outputs" / run_id / "checkpoints" / "last.ckpt"
    profiled = {"PYTHONPROFILEIMPORTTIME": "1"}

    refused = run_entry("train.py", f"resume={run_id}", "objective.beta=4", root=project, check=False, env=profiled)
    assert refused.returncode == 2 and "no other overrides (objective.beta=4)" in refused.stderr
    assert not {"torch", "lightning", "mlflow"} & imported(refused.stderr)

    done = run_entry("train.py", f"resume={run_id}", "trainer.max_epochs=2", root=project)
    said = [line for line in done.stdout.splitlines() if run_id in line or "resum" in line]
    assert said == [f"vaelab: resuming run {run_id} from {checkpoint} (epoch 1 of 2; trainer.max_epochs was 1)"]
    assert "trained (best epoch" in done.stdout
    for notice in ("exists and is not empty", "Restoring states", "Restored all states", "weights_only"):
        assert notice not in done.stdout + done.stderr

    finished = run_entry("train.py", "resume=last", root=project)
    lines = [line for line in finished.stdout.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"vaelab: run {run_id} already finished all its 2 epochs")


@pytest.mark.integration
def test_an_extension_stopped_while_it_was_being_finished_is_finished_by_the_next_resume(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    run_id = train(make_config(*TINY, "trainer.max_epochs=1"))["run_id"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as during_figures:
        during_figures.setattr(train_stage, "save_figures", stopped)
        with pytest.raises(TrainingInterrupted, match="without training again"):
            train(resume_command(during_figures, f"resume={run_id}", "trainer.max_epochs=2"))
    [put_back] = all_runs(project)
    assert put_back.info.status == "FINISHED"  # as it was before the extension: its finishing covers one epoch
    capsys.readouterr()

    again = train(resume_command(monkeypatch, f"resume={run_id}"))

    checkpoint = project / "outputs" / run_id / "checkpoints" / "last.ckpt"
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vaelab:")]
    finishing = "(epoch 2 of 2: training is done, finishing the run)"
    assert said == [f"vaelab: resuming run {run_id} from {checkpoint} {finishing}"]
    assert "already_finished" not in again and again["epochs"] == 2
    [run] = all_runs(project)
    assert run.info.status == "FINISHED" and run.data.tags["vaelab.extended_to"] == "2"
