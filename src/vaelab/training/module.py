"""The LightningModule: a VAE, its training objective, and its logged metrics.

Logged, in nats per image (signs as in the README):
    train/loss   minus the training objective (the `objective` component: beta, warm-up, free bits, capacity, IWAE)
    */elbo       the plain bound, beta = 1, so runs with different objectives stay comparable
    */rec, */kl  -E_q[log p(x|z)] and KL(q(z|x) || p(z)), both >= 0
    val/bpd      -val/elbo in bits per dimension (an upper bound on the NLL in bits/dim)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from vaelab.model.objectives import Objective, bits_per_dim
from vaelab.training.builder import DEFAULT_OPTIMIZER, build, build_optimizer, build_vae

SELECTION_METRIC = "select/val_elbo"
PROGRESS_EVERY = 20  # batches between updates of the progress bar's loss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite and `nan_policy=fail`."""


@dataclass
class EpochTally:
    """One training epoch's running totals. `sums`: [3] float64 on the device, the loss, rec and KL (nats per image)
    each times its step's images, over the finite steps. Changed in place, so a step costs no attribute writes on the
    module."""

    sums: torch.Tensor
    images: int = 0  # images of the finite steps: what the logged means average over
    skipped: int = 0  # non-finite steps skipped under nan_policy=skip
    seen: int = 0  # every training image of the epoch, skipped steps included


class VAEModule(pl.LightningModule):
    """Every argument is a plain Python value, so checkpoints load with `weights_only=True`. `optimizer` and
    `scheduler` are partial configs (`{_target_: torch.optim.Adam, _partial_: true, lr: ...}`) that the module
    completes with its parameters and its optimizer."""

    def __init__(
        self,
        image_shape: list[int],
        arch: dict,
        likelihood: dict,
        latent_dim: int,
        objective: dict,
        posterior: dict,
        prior: dict,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        nan_policy: str = "fail",
        grey_levels: int = 256,
        channels_last: bool = False,
    ):
        super().__init__()
        # logger=False: tracking logs the whole composed config once; Lightning must not log it again.
        self.save_hyperparameters(logger=False)
        self.vae = build_vae(image_shape, arch, likelihood, latent_dim, grey_levels, posterior, prior)
        self.objective: Objective = build(objective)
        if channels_last:
            # Conv weights only (linear ones have no such format); convolutions then run in that format. On one
            # CPU the conv and resnet steps are faster (benchmarks/README.md); on GPUs it is cuDNN's fast path.
            self.vae.to(memory_format=torch.channels_last)
        self.dims = math.prod(image_shape)
        # Provenance written into every checkpoint: run id, data hash, composed config (set by training).
        self.lineage: dict[str, Any] = {}

    # Lightning records the hook it is running on the module before and after every hook it calls, about forty times a
    # training step. nn.Module's __setattr__ first checks each value against the parameters, buffers and submodules;
    # a hook's name is none of those, so it is stored directly.
    LIGHTNING_BOOKKEEPING = frozenset({"_current_fx_name"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.LIGHTNING_BOOKKEEPING:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- training -------------------------------------------------------------------------------

    # The training step runs the optimizer itself (manual optimization): Lightning's automatic loop wraps every step
    # in a closure and more hooks, a measurable share of a small model's step (benchmarks/README.md). It falls back to
    # the automatic loop when the Trainer is asked to clip gradients or accumulate them, which Lightning does only
    # there.
    @property
    def automatic_optimization(self) -> bool:
        trainer = self._trainer
        return trainer is not None and (bool(trainer.gradient_clip_val) or trainer.accumulate_grad_batches != 1)

    def progress(self, batch_idx: int) -> float:
        """Training progress in fractional epochs, for the warm-up and capacity schedules."""
        return self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        out = self.vae(x, k=self.objective.latent_samples)
        loss = self.objective.loss(out, self.progress(batch_idx))
        tally = self.tally
        tally.seen += len(x)
        finite = bool(torch.isfinite(loss))
        if finite:
            self.accumulate(loss, out, len(x), batch_idx)
        elif self.hparams.nan_policy == "skip":
            tally.skipped += 1
        else:
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx}"
            )
        last = batch_idx == self.trainer.num_training_batches - 1
        if last:
            self.log_epoch_metrics()
        if self.automatic_optimization:
            return loss if finite else None  # None: Lightning skips backward; its optimizer step finds no gradients
        self.optimize(loss if finite else None, epoch_ends=last)
        return None

    def optimize(self, loss: torch.Tensor | None, epoch_ends: bool) -> None:
        """One optimizer step on `loss`, as Lightning's automatic loop takes it: the gradients are zeroed, then
        back-propagated, then stepped. A skipped step (`loss` None) still steps, with no gradients, so it counts in
        `global_step` as it always has. The learning-rate schedule moves once an epoch, after the epoch's last step
        and before validation, so checkpoints hold the same scheduler state as with the automatic loop."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if loss is not None:
            self.manual_backward(loss)
        optimizer.step()
        schedule = self.lr_schedulers()
        if epoch_ends and schedule is not None:
            schedule.step()

    # Per-step self.log calls cost a large share of a small model's step in Lightning's bookkeeping (benchmarks/
    # README.md). So the epoch's training metrics are summed on the device, with no host sync, and logged once, at
    # its last batch.
    # train/elbo is -(rec + kl) image by image, so its mean needs no sum of its own.
    SUMMED = ("train/loss", "train/rec", "train/kl")

    def on_train_epoch_start(self) -> None:
        self.tally = EpochTally(torch.zeros(len(self.SUMMED), device=self.device, dtype=torch.float64))

    @property
    def images_this_epoch(self) -> int:
        """Training images this epoch so far, those of skipped steps included: what throughput counts."""
        return self.tally.seen

    def accumulate(self, loss: torch.Tensor, out, n: int, batch_idx: int) -> None:
        with torch.no_grad():
            self.tally.sums.add_(torch.stack([loss, out.rec.mean(), out.kl.mean()]), alpha=n)
        self.tally.images += n
        if batch_idx % PROGRESS_EVERY == 0:
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)  # a live value for the progress bar

    def log_epoch_metrics(self) -> None:
        tally = self.tally
        if tally.skipped and not tally.images:
            # nan_policy=skip rides out a bad batch; an epoch with no finite step at all learned nothing, and every
            # later one would do the same (the weights are unchanged, or already non-finite).
            raise NonFiniteLossError(
                f"every training step of epoch {self.current_epoch} ({tally.skipped} steps) had a non-finite loss, so "
                "nan_policy=skip skipped them all: the model diverged or the data is not finite (lower optim.lr, or "
                "check the data)"
            )
        metrics = {}
        if tally.images:
            loss, rec, kl = (tally.sums / tally.images).float()
            metrics = {"train/loss": loss, "train/elbo": -(rec + kl), "train/rec": rec, "train/kl": kl}
            metrics.update(self.objective.logged())
        if tally.skipped:
            metrics["train/skipped_steps"] = float(tally.skipped)
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def selectable(self) -> bool:
        """May this epoch's weights be chosen as the best? Only if it trained wholly with the final objective, from
        epoch `ramp_epochs` (0-based) on: during a warm-up the KL weight is below beta, in its last epoch too, so
        those epochs would win on val/elbo without being the model asked for. The last epoch is always a candidate,
        for runs no longer than their ramp."""
        first_selectable = min(self.objective.ramp_epochs, self.trainer.max_epochs - 1)
        return self.current_epoch >= first_selectable

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        out = self.vae(x)
        elbo = out.elbo.mean()
        # What the best checkpoint is chosen by: val/elbo, or -inf while the objective is still ramping.
        selection = elbo if self.selectable() else torch.full_like(elbo, -math.inf)
        self.log(SELECTION_METRIC, selection, logger=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log_dict(
            {
                "val/elbo": elbo,
                "val/rec": out.rec.mean(),
                "val/kl": out.kl.mean(),
                "val/bpd": bits_per_dim(-elbo, self.dims),
            },
            on_epoch=True,
            batch_size=len(x),
            sync_dist=True,
        )

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameters(), self.hparams.optimizer or DEFAULT_OPTIMIZER)
        if self.hparams.scheduler is None:
            return optimizer
        schedule = build(self.hparams.scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # -- provenance in checkpoints --------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vaelab"] = self.lineage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.lineage = checkpoint.get("vaelab", {})
