"""Lightning callbacks and plugins of vaelab's own. Everything else comes from Lightning itself."""

from __future__ import annotations

import io
import math
from datetime import timedelta
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vaelab.files import write_bytes_atomic
from vaelab.paths import INTERRUPTED


class EpochCallback(Callback):
    """A callback with no work to do at a training step: its per-step hooks are None, which Lightning skips.

    Lightning calls every callback's per-step hooks at every step, five or six of them, each through its profiler and
    its record of the running hook: a measurable share of a small model's step for hooks that do nothing
    (benchmarks/README.md). An attribute that is not callable, it does not call at all."""

    on_train_batch_start = None
    on_before_backward = None
    on_after_backward = None
    on_before_optimizer_step = None
    on_before_zero_grad = None
    on_train_batch_end = None


class EpochHistory(EpochCallback):
    """Per-epoch train and val metrics plus training throughput, for curves and `metrics/train.json`.

    Throughput counts training images over the training part of the epoch only (validation excluded). The module
    counts them (`images_this_epoch`, as VAEModule does): a per-batch hook here would cost every step a call.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._train_seconds: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._train_seconds = perf_counter(), None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._train_seconds is None:
            self._train_seconds = perf_counter() - self._start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._train_seconds if self._train_seconds is not None else perf_counter() - self._start
        # Under DDP each rank trains its own shard at the same time: the run's throughput is the ranks' sum.
        local = torch.tensor(pl_module.images_this_epoch / max(seconds, 1e-9), device=pl_module.device)
        throughput = float(trainer.strategy.reduce(local, reduce_op="sum"))
        pl_module.log("train/images_per_sec", throughput, rank_zero_only=True)
        row = {
            "epoch": trainer.current_epoch,
            "train/epoch_seconds": seconds,
            "train/images_per_sec": throughput,
        }
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                row[key] = float(value)
        self.rows.append(row)

    # The history travels in checkpoints, so a resumed run's curves and summary cover all its epochs.
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    images_per_sec: float | None,
    train_loss: float | None,
    val_elbo: float | None,
    elapsed: float,
    left: float | None,
) -> str:
    """One epoch as one line of plain text, e.g.
    `epoch 3/10 | 5123 images/s | train loss 27.41 | val/elbo -26.93 | 0:00:12 elapsed, ~0:00:28 left`.

    `epoch` counts from 1; `train_loss` is the epoch's mean, `val_elbo` its validation's (nats); `elapsed` and `left`
    are seconds. A number that is None (no validation, no end in epochs) is left out with its label."""

    def clock(seconds: float) -> str:
        return str(timedelta(seconds=round(seconds)))

    parts = [f"epoch {epoch}/{max_epochs}" if max_epochs else f"epoch {epoch}"]
    if images_per_sec is not None:
        parts.append(f"{images_per_sec:.0f} images/s")
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.2f}")
    if val_elbo is not None:
        parts.append(f"val/elbo {val_elbo:.2f}")
    parts.append(f"{clock(elapsed)} elapsed" + (f", ~{clock(left)} left" if left is not None else ""))
    return " | ".join(parts)


class EpochLines(EpochCallback):
    """A run's progress as one printed line per epoch (`epoch_line`), flushed: the progress bar of a log file.

    Prints the row `history` has just recorded (so it comes after `history` among the Trainer's callbacks), on rank
    zero only. The time left is the mean epoch since fit began times the epochs still to go."""

    def __init__(self, history: EpochHistory) -> None:
        self.history = history
        self._fit_began = 0.0
        self._first_epoch: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_began, self._first_epoch = perf_counter(), None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first_epoch is None:  # a resumed run starts past epoch 0: only the epochs of this fit are timed
            self._first_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history.rows:
            return
        row = self.history.rows[-1]
        epoch = trainer.current_epoch + 1
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        elapsed = perf_counter() - self._fit_began
        first = self._first_epoch if self._first_epoch is not None else trainer.current_epoch
        left = elapsed / (epoch - first) * (max_epochs - epoch) if max_epochs else None
        line = epoch_line(
            epoch,
            max_epochs,
            row.get("train/images_per_sec"),
            row.get("train/loss"),
            row.get("val/elbo"),
            elapsed,
            left,
        )
        print(line, flush=True)


class RngState(EpochCallback):
    """Saves and restores the torch RNGs (CPU and CUDA) with each checkpoint, so a resumed run draws the
    binarization noise and latent samples it would have drawn. Data order is seeded by epoch already."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class InterruptCheckpoint(EpochCallback):
    """On Ctrl-C or SIGTERM, the state at that moment is saved as `interrupted.ckpt`, beside `last.ckpt`.

    Only on an interrupt: a failure's state is not worth keeping. `last.ckpt`, the end of the last complete
    epoch, stays as it was: that is what `resume=` continues from, since a mid-epoch restart would see some of
    the epoch's batches twice. (Not Lightning's OnExceptionCheckpoint: its presence makes every `fit` without a
    checkpoint path look for one to resume from.)"""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / INTERRUPTED

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            trainer.save_checkpoint(self.path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Only reached when fit ends normally: a resumed run that finishes has no interrupted state any more.
        self.path.unlink(missing_ok=True)


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, redrawn every `refresh_rate` training batches but at most once every
    `min_seconds`, and always at the epoch's last batch.

    Lightning's own redraws (and re-reads the progress-bar metrics) after every batch whatever `refresh_rate` says.
    A redraw costs milliseconds, so even every 20 batches of a small model's 5 ms steps it took ~2% of training
    (benchmarks/README.md, "Hand-written paths kept for speed"); two redraws a second keep that below half a percent
    at any step time."""

    def __init__(self, *args: Any, min_seconds: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_seconds = min_seconds
        self._drawn_at = -math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = batch_idx + 1
        due = done % self.refresh_rate == 0 and perf_counter() - self._drawn_at >= self.min_seconds
        if due or done == self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._drawn_at = perf_counter()

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning shows the epoch index against max_epochs - 1 ("Epoch 1/1" in the second of two epochs); the
        # bar counts as people and the off-terminal epoch lines do, from 1 to max_epochs.
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            description += f"/{self.trainer.max_epochs}"
        return f"{description:{len(self.validation_description)}}"  # padded as Lightning pads it: no flicker

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        # v_num is the logger's version, an MLflow run id here: the run's own lines already name it.
        return {name: value for name, value in super().get_metrics(trainer, pl_module).items() if name != "v_num"}

    # Its per-step hooks other than on_train_batch_end do nothing: skipped, as for EpochCallback.
    on_train_batch_start = None
    on_before_backward = None
    on_after_backward = None
    on_before_optimizer_step = None
    on_before_zero_grad = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target, flushed, then renamed over it: a kill during a save leaves the
    previous `last.ckpt` intact. (Lightning's own save goes through a temp file that may sit on another
    filesystem, where the final move is a copy that a kill can cut short.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(Path(path), buffer.getvalue())
