"""The training loop: the module steps its optimizer itself, and everything that rides on the loop still works, the
learning-rate schedule, gradient clipping, skipped steps and the epoch's throughput, for a fraction of the per-step
bookkeeping (callbacks with nothing to do at a step are not called at each step; the bar redraws a few times a
second)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.profilers import Profiler

from helpers.config import make_config
from vaelab.data.datamodule import TensorBatches
from vaelab.stages.train import build_module
from vaelab.training.callbacks import EpochHistory, InterruptCheckpoint, RngState, ThrottledRichProgressBar
from vaelab.training.module import VAEModule

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

IMAGES, BATCH = 40, 8  # five steps an epoch
STEPS_PER_EPOCH = IMAGES // BATCH


def tiny_module(*overrides: str) -> VAEModule:
    return build_module(make_config("arch.hidden=[16]", "model.latent_dim=2", *overrides), (1, 8, 8), 256)


def fit(module: VAEModule, root: Path, epochs: int = 2, callbacks=(), **trainer_args) -> pl.Trainer:
    images = (torch.rand(IMAGES, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=any(isinstance(c, RichProgressBar) for c in callbacks),
        default_root_dir=str(root),
        callbacks=list(callbacks),
        **trainer_args,
    )
    trainer.fit(module, train_dataloaders=TensorBatches(images, BATCH, shuffle=True))
    return trainer


class PoisonBatch(Callback):
    """Turns the first epoch's third batch into NaNs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 2:
            batch.fill_(float("nan"))


@pytest.mark.parametrize(
    ("trainer_args", "automatic"),
    [({}, False), ({"gradient_clip_val": 1.0}, True), ({"accumulate_grad_batches": 2}, True)],
)
def test_the_module_steps_its_optimizer_itself_unless_the_trainer_clips_or_accumulates(trainer_args, automatic):
    module = tiny_module()
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, **trainer_args)
    assert module.automatic_optimization is automatic


def test_the_learning_rate_moves_once_an_epoch_after_the_epochs_last_step(tmp_path: Path):
    lr = 0.01
    module = tiny_module("scheduler=cosine", "trainer.max_epochs=4", f"optim.lr={lr}")  # a cosine over 4 epochs
    seen: list[float] = []

    class EpochLearningRate(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = fit(module, tmp_path, epochs=2, callbacks=[EpochLearningRate()])
    cosine = [lr * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(3)]
    assert seen == pytest.approx(cosine[:2])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(cosine[2])
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # what a checkpoint of epoch 1 holds


def test_gradient_clipping_by_the_trainer_bounds_every_update(tmp_path: Path):
    def update_norm(**trainer_args) -> float:
        torch.manual_seed(0)
        module = tiny_module("optim._target_=torch.optim.SGD", "optim.lr=1.0", "~optim.weight_decay")
        before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        fit(module, tmp_path, epochs=1, limit_train_batches=1, **trainer_args)
        return float((torch.cat([p.detach().flatten() for p in module.parameters()]) - before).norm())

    clip = 1e-3
    assert update_norm() > 100 * clip  # the bound below is the clipping's doing
    assert update_norm(gradient_clip_val=clip) == pytest.approx(clip, rel=1e-3)


def test_a_skipped_step_still_counts_as_a_step(tmp_path: Path):
    module = tiny_module("nan_policy=skip")
    trainer = fit(module, tmp_path, epochs=2, callbacks=[PoisonBatch()])
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_epoch_history_counts_every_training_image_of_the_epoch_skipped_steps_included(tmp_path: Path):
    history = EpochHistory()
    fit(tiny_module("nan_policy=skip"), tmp_path, epochs=2, callbacks=[PoisonBatch(), history])
    images = [row["train/images_per_sec"] * row["train/epoch_seconds"] for row in history.rows]
    assert images == pytest.approx([IMAGES, IMAGES])


class HookRecorder(Profiler):
    """Every action Lightning profiles, by name: callback hooks appear as `[Callback]<state key>.<hook>`."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: list[str] = []

    def start(self, action_name: str) -> None:
        self.actions.append(action_name)

    def stop(self, action_name: str) -> None:
        pass

    def summary(self) -> str:
        return ""


def test_callbacks_with_nothing_to_do_at_a_step_are_not_called_at_each_step(tmp_path: Path):
    recorder = HookRecorder()
    callbacks = [EpochHistory(), RngState(), InterruptCheckpoint(tmp_path)]
    fit(tiny_module(), tmp_path, epochs=2, callbacks=callbacks, profiler=recorder)
    for callback in callbacks:
        called = {a.split(".")[-1] for a in recorder.actions if a.startswith(f"[Callback]{callback.state_key}.")}
        assert not called & {"on_train_batch_start", "on_before_backward", "on_after_backward",
                             "on_before_optimizer_step", "on_train_batch_end"}  # fmt: skip
        assert "on_train_epoch_end" in called  # its epoch hooks still run
    assert len(callbacks[0].rows) == 2


def test_the_progress_bar_redraws_at_most_once_every_min_seconds_and_at_each_epochs_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    drawn: list[tuple[int, int]] = []
    monkeypatch.setattr(
        RichProgressBar,
        "on_train_batch_end",
        lambda self, trainer, *args: drawn.append((trainer.current_epoch, args[-1] + 1)),
    )
    bar = ThrottledRichProgressBar(refresh_rate=1, min_seconds=3600)
    fit(tiny_module(), tmp_path, epochs=2, callbacks=[bar])
    assert drawn == [(0, 1), (0, STEPS_PER_EPOCH), (1, STEPS_PER_EPOCH)]
