"""Training end to end on small real data: an MLflow run with metrics, lineage and artifacts; NaN handling."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers.config import TINY, make_config
from helpers.processes import copy_processed, run_entry
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.checkpoints import load_trained
from vaelab.stages.evaluate import evaluate
from vaelab.stages.phases import PHASES
from vaelab.stages.train import build_module, train
from vaelab.tracking.run import PARENT_TAG, Run
from vaelab.training.builder import build_optimizer
from vaelab.training.module import SELECTION_METRIC, NonFiniteLossError


@pytest.mark.integration
def test_one_short_training_makes_a_finished_run_linked_to_its_checkpoint(project: Path):
    summary = train(make_config(*TINY, "publish=true"))

    [run] = all_runs(project)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in (
        "train/loss",
        "train/elbo",
        "train/rec",
        "train/kl",
        "val/elbo",
        "val/rec",
        "val/kl",
        "val/bpd",
        "val/nll_iw",
        "val/inference_gap",
    ):
        assert name in metrics, name
    assert metrics["val/elbo"] < 0 and metrics["val/rec"] > 0 and metrics["val/kl"] >= 0
    assert metrics["train/loss"] == pytest.approx(-metrics["train/elbo"], rel=1e-5)  # beta = 1, no warm-up
    assert summary["val/elbo"] == pytest.approx(metrics["val/elbo"])
    # where its wall time went, phase by phase (no evaluation: eval.after_train is off)
    phases = {name for name in metrics if name.startswith("time/")}
    assert phases == {f"time/{phase}_s" for phase in PHASES if phase != "evaluation"}
    assert all(metrics[name] > 0 for name in phases)

    assert run.data.params["model.latent_dim"] == "4"
    assert run.data.params["data.name"] == "digits"
    tags = run.data.tags
    assert tags["vaelab.stage"] == "train" and tags["vaelab.representation"] == "binary"
    assert len(tags["vaelab.data_hash"]) == 64 and tags["vaelab.git_commit"]
    assert tags["vaelab.git_dirty"] in ("true", "false") and "pytest" in tags["vaelab.command"]
    assert "vaelab.overrides" in tags  # empty here: composed in-process, not from a command line

    artifacts = artifact_paths(mlflow_client(project), run_id)
    assert {
        "config/config.yaml",
        "checkpoints/best.ckpt",
        "figures/reconstructions.png",
        "figures/samples.png",
        "figures/traversals.png",
        "figures/interpolations.png",
        "figures/latent_scatter.png",
        "figures/kl_per_dim.png",
        "figures/training_curves.png",
    } <= artifacts

    # one run id links the output folder, the published model and the checkpoint's own record
    assert (project / "outputs" / run_id / "checkpoints" / "best.ckpt").is_file()
    assert (project / "models" / "latest" / "run_id").read_text().strip() == run_id
    module = load_trained(project / "models" / "latest" / "model.ckpt")  # weights_only=True
    assert module.lineage["run_id"] == run_id
    assert module.hparams.latent_dim == 4
    assert json.loads((project / "metrics" / "train.json").read_text())["run_id"] == run_id
    assert (project / "plots" / "train" / "curve.csv").is_file()


@pytest.mark.integration
def test_a_direct_training_keeps_to_its_run_folder_and_leaves_dvcs_outputs_alone(project: Path):
    """models/latest/, metrics/ and plots/ describe the run DVC's stages published: a direct run that wrote them
    would pair one run's parameters with another's metrics in `dvc exp show`."""
    summary = train(make_config(*TINY))

    run_folder = project / "outputs" / summary["run_id"]
    assert json.loads((run_folder / "train.json").read_text())["val/elbo"] == pytest.approx(summary["val/elbo"])
    assert (run_folder / "checkpoints" / "best.ckpt").is_file()
    for published in ("models", "metrics", "plots"):
        assert not (project / published).exists(), published
    [run] = all_runs(project)
    assert "time/publish_s" not in run.data.metrics


class FailAtFitStart(Callback):
    def on_fit_start(self, trainer, pl_module):
        raise RuntimeError("bogus state at fit start")


@pytest.mark.integration
def test_a_failure_after_the_run_exists_marks_it_failed_not_running(project: Path):
    # (A bad Trainer argument no longer gets this far: vaelab.stages.preflight refuses it before the run.)
    with pytest.raises(RuntimeError, match="bogus"):
        train(make_config(*TINY), callbacks=[FailAtFitStart()])
    [run] = all_runs(project)
    assert run.info.status == "FAILED"
    assert "bogus" in run.data.tags["vaelab.failure"]


class PoisonBatch(Callback):
    """Turns one training batch into NaNs, so that step's loss is NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 2:
            batch.fill_(float("nan"))


@pytest.mark.integration
def test_a_nan_loss_fails_the_run_with_the_reason(project: Path):
    with pytest.raises(NonFiniteLossError):
        train(make_config(*TINY, "nan_policy=fail", "publish=true"), callbacks=[PoisonBatch()])
    [run] = all_runs(project)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["vaelab.failure"]
    assert "epoch 0, batch 2" in run.data.tags["vaelab.failure"]  # stopped at the poisoned step itself
    assert not (project / "models" / "latest").exists()  # a failed run publishes nothing


@pytest.mark.integration
def test_nan_policy_skip_drops_the_step_and_finishes(project: Path):
    train(make_config(*TINY, "nan_policy=skip"), callbacks=[PoisonBatch()])
    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    history = mlflow_client(project).get_metric_history(run.info.run_id, "train/skipped_steps")
    assert [m.value for m in history] == [1.0]  # logged in the epoch that skipped, once
    for parameter in load_trained(project / "outputs" / run.info.run_id / "checkpoints" / "best.ckpt").parameters():
        assert torch.isfinite(parameter).all()


@pytest.mark.subprocess
def test_train_then_evaluate_on_fashion_mnist_log_into_one_run(project: Path, fashion_processed: Path):
    copy_processed(project, fashion_processed)
    run_entry("train.py", "data.limit_train=2000", "trainer.max_epochs=1", "eval.val_limit=200", root=project)
    done = run_entry("evaluate.py", "eval.iw_k=50", "eval.limit=300", root=project)
    assert "nll_iw" in done.stdout

    [run] = all_runs(project)
    # nothing was published, so evaluate takes the newest finished training run, and says so
    best = project / "outputs" / run.info.run_id / "checkpoints" / "best.ckpt"
    newest = "the newest finished training run: models/latest/ holds no published model"
    assert f"vaelab: evaluating run {run.info.run_id}: {best} ({newest})" in done.stdout
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["test/nll_iw"] <= -metrics["test/elbo"]  # the IW bound is the tighter one
    assert metrics["test/inference_gap"] == pytest.approx(-metrics["test/elbo"] - metrics["test/nll_iw"], abs=1e-3)
    assert 0 < metrics["test/bpd"] < 1
    assert 0 < metrics["test/nll_iw_se"] < 5 and 1 <= metrics["test/iw_ess"] <= 50
    assert 0 < metrics["test/active_units"] <= 16
    assert {
        "evaluation/reconstructions.png",
        "evaluation/samples.png",
        "evaluation/traversals.png",
        "evaluation/interpolations.png",
        "evaluation/latent_scatter.png",
        "evaluation/kl_per_dim.csv",
    } <= (artifact_paths(mlflow_client(project), run.info.run_id))
    # its results are the run's own: metrics/ and plots/ stay DVC's
    evaluation = json.loads((project / "outputs" / run.info.run_id / "eval.json").read_text())
    assert evaluation["run_id"] == run.info.run_id and evaluation["test/nll_iw"] == metrics["test/nll_iw"]
    assert (project / "outputs" / run.info.run_id / "evaluation" / "reconstructions.png").is_file()
    assert not (project / "metrics").exists() and not (project / "plots").exists()


@pytest.mark.integration
def test_the_evaluate_stage_tags_and_tells_a_mutual_information_within_half_a_nat_of_log_n(project: Path, capsys):
    """On one image log N = 0, so its mutual information (0) measures nothing; on 50 test images the mutual
    information of a one-epoch model is far below log N."""
    run_id = train(make_config(*TINY, "trainer.max_epochs=1"))["run_id"]
    capsys.readouterr()
    evaluate(make_config(*TINY, "eval.limit=50"))
    assert "vaelab.mi_saturated" not in mlflow_client(project).get_run(run_id).data.tags
    assert "mutual_info" not in capsys.readouterr().out

    evaluate(make_config(*TINY, "eval.limit=1"))
    saturated = mlflow_client(project).get_run(run_id).data.tags["vaelab.mi_saturated"]
    assert "within 0.5 nats of its maximum log N = 0.00 (N = 1)" in saturated
    assert f"vaelab: warning: {saturated}" in capsys.readouterr().out.splitlines()


@pytest.mark.subprocess
def test_evaluation_is_reproducible(project: Path):
    train(make_config(*TINY))
    first = run_entry("evaluate.py", "data=digits", "eval.iw_k=20", root=project)
    second = run_entry("evaluate.py", "data=digits", "eval.iw_k=20", root=project)
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]


class SelectionSpy(Callback):
    """Records, per epoch, the value the best checkpoint is chosen by."""

    def __init__(self):
        self.values: list[float] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics[SELECTION_METRIC]))


@pytest.mark.integration
@pytest.mark.parametrize(("warmup", "first_candidate"), [(2, 2), (5, 3)])
def test_epochs_of_the_kl_warmup_its_last_included_are_never_the_best_checkpoint(
    project: Path, warmup: int, first_candidate: int
):
    """During a warm-up the KL weight is below beta, which flatters val/elbo: its epochs are not candidates, the last
    one included (it too trained with a smaller weight). The last epoch always is, even inside a longer warm-up."""
    spy = SelectionSpy()
    overrides = ("trainer.max_epochs=4", "objective.beta=8", f"objective.kl_warmup_epochs={warmup}")
    summary = train(make_config(*TINY, *overrides), callbacks=[spy])
    assert spy.values[:first_candidate] == [float("-inf")] * first_candidate
    assert all(math.isfinite(v) for v in spy.values[first_candidate:])
    assert first_candidate <= summary["best_epoch"] <= 3
    best = torch.load(project / "outputs" / summary["run_id"] / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]


@pytest.mark.parametrize(("warmup", "candidates"), [(0, [0, 1, 2, 3]), (2, [2, 3]), (3, [3]), (4, [3]), (5, [3])])
def test_the_candidates_for_the_best_checkpoint_are_the_epochs_trained_wholly_after_the_warmup(
    warmup: int, candidates: list[int]
):
    overrides = ("trainer.max_epochs=4", "objective.beta=8", f"objective.kl_warmup_epochs={warmup}")
    module = build_module(make_config(*TINY, *overrides), image_shape=(1, 8, 8), grey_levels=2)
    chosen = []
    for epoch in range(4):
        module.trainer = SimpleNamespace(max_epochs=4, current_epoch=epoch)
        if module.selectable():
            chosen.append(epoch)
    assert chosen == candidates


@pytest.mark.integration
def test_a_nested_run_sits_under_its_parent_and_publishes_nothing_shared(project: Path):
    cfg = make_config(*TINY, "publish=true")  # a nested run publishes nothing, even asked to
    parent = Run.create(cfg, stage="sweep", overrides=[], tags={}, log_params=False)
    summary = train(cfg, parent_run_id=parent.run_id)
    child = mlflow_client(project).get_run(summary["run_id"])
    assert child.data.tags[PARENT_TAG] == parent.run_id
    assert child.info.status == "FINISHED"
    assert mlflow_client(project).get_run(parent.run_id).data.params == {}
    assert (project / "outputs" / summary["run_id"] / "checkpoints" / "best.ckpt").is_file()
    assert not (project / "models").exists() and not (project / "metrics").exists()


def test_the_fused_optimizer_takes_the_same_steps_as_the_plain_one():
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    plain_model = copy.deepcopy(fused_model)
    start = copy.deepcopy(fused_model[0].weight.detach())
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
    fused = build_optimizer(fused_model.parameters(), {**adam, "fused": True})
    plain = build_optimizer(plain_model.parameters(), {**adam, "fused": False})
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(5):
        x = torch.randn(32, 8)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(fused_model[0].weight, start)  # the steps did move the weights
    # An optimizer without a fused kernel is built plainly rather than refused.
    rmsprop = {"_target_": "torch.optim.RMSprop", "_partial_": True, "fused": True}
    assert "fused" not in build_optimizer(fused_model.parameters(), rmsprop).defaults


class ProgressBarSpy(Callback):
    def __init__(self):
        self.bar = "unset"

    def on_fit_start(self, trainer, pl_module):
        self.bar = trainer.progress_bar_callback


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("ThrottledRichProgressBar", 20)),
        (["callbacks.progress.refresh_rate=5"], ("ThrottledRichProgressBar", 5)),
        (["callbacks=none"], None),  # no bar at all, not Lightning's default one
        (["~callbacks.progress"], None),
    ],
)
def test_the_progress_bar_is_a_configured_callback(project: Path, overrides: list[str], expected):
    spy = ProgressBarSpy()
    train(make_config(*TINY, "trainer.max_epochs=1", "logger=none", *overrides), callbacks=[spy])
    bar = spy.bar
    assert (None if bar is None else (type(bar).__name__, bar.refresh_rate)) == expected
