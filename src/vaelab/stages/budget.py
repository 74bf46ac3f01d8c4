"""Work that would take far longer than its user expects is timed and named before it starts, not discovered hours in.

- An importance-sampled estimate (val/nll_iw at the end of training, test/nll_iw in evaluate) is timed on one chunk
  of its work before it runs: past `eval.max_minutes` it is refused, naming the k that asked for it and the k that
  would fit; past SAY_AFTER_S its expected duration is printed.
- A training step timed above SLOW_STEP_S gets a warning before training: every epoch is that slow, and a stop signal
  takes effect between two operations of a step, so Ctrl-C or SIGTERM may take up to a step to act.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from vaelab.errors import ConfigError
from vaelab.model.estimators import estimated_seconds

SAY_AFTER_S = 10.0
SLOW_STEP_S = 10.0
# Below this many parameters x images per batch a CPU step takes well under a second: not worth timing.
TIME_STEP_ABOVE = 2e8
BACKWARD_FACTOR = 3.0  # a step's forward, backward and update take about three forward passes


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.5 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_estimate(vae, images: torch.Tensor, k: int, key: str, max_minutes: float | None, what: str) -> None:
    """Refuse (naming `key`) an estimate of `what` with k samples per image timed to take over `max_minutes`; say
    how long it will take when that is long enough to wonder."""
    if len(images) == 0:
        return
    seconds = estimated_seconds(vae, images, k)
    if max_minutes is not None and seconds > 60 * max_minutes:
        fits = max(1, int(k * 60 * max_minutes / seconds))
        raise ConfigError(
            [
                (
                    key,
                    k,
                    f"a k whose {what} fits eval.max_minutes={max_minutes:g}: k={k} on {len(images)} images is timed "
                    f"at about {duration(seconds)}; k <= {fits} fits (or raise eval.max_minutes, or lower the image "
                    "count)",
                )
            ]
        )
    if seconds >= SAY_AFTER_S:
        print(f"vaelab: {what} (k={k}, {len(images)} images) will take about {duration(seconds)}", flush=True)


@torch.inference_mode()
def step_seconds(vae, images: torch.Tensor) -> float:
    """One training step's time on `images` (a batch), from one timed forward pass."""
    start = time.perf_counter()
    _ = vae.decode_pass(images, vae.encode(images), k=1).log_weights
    return BACKWARD_FACTOR * (time.perf_counter() - start)


def warn_if_slow_step(vae, val_images: torch.Tensor, cfg: DictConfig) -> float | None:
    """Time a training step of a large model on the CPU before training, and warn when it is slow; the estimate in
    seconds (None when the model is too small to bother, or trains on an accelerator, which this cannot time)."""
    if str(cfg.trainer.get("accelerator", "auto")) not in ("cpu", "auto") or torch.cuda.is_available():
        return None
    batch = int(cfg.data.batch_size)
    parameters = sum(p.numel() for p in vae.parameters())
    if parameters * batch < TIME_STEP_ABOVE or len(val_images) == 0:
        return None
    images = val_images[:batch]
    seconds = step_seconds(vae, images) * batch / len(images)
    if seconds > SLOW_STEP_S:
        print(
            f"vaelab: warning: one training step is timed at about {duration(seconds)} ({parameters:,} parameters, "
            f"batch {batch}, CPU): each epoch takes that many times its batches, and Ctrl-C or SIGTERM take effect "
            "within a step",
            flush=True,
        )
    return seconds
