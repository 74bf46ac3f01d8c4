"""Lightning callbacks of vaelab's own. Everything else comes from Lightning itself."""

from __future__ import annotations

from time import perf_counter

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class EpochHistory(Callback):
    """Per-epoch train and val metrics plus training throughput, for curves and `metrics/train.json`.

    Throughput counts training images over the training part of the epoch only (validation excluded).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._images = 0
        self._train_seconds: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images, self._train_seconds = perf_counter(), 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._train_seconds is None:
            self._train_seconds = perf_counter() - self._start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._train_seconds if self._train_seconds is not None else perf_counter() - self._start
        throughput = self._images / max(seconds, 1e-9)
        pl_module.log("train/images_per_sec", throughput)
        row = {
            "epoch": trainer.current_epoch,
            "train/epoch_seconds": seconds,
            "train/images_per_sec": throughput,
        }
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                row[key] = float(value)
        self.rows.append(row)
