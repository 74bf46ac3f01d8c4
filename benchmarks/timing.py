"""Clock and memory readings shared by every benchmark worker, vaelab's and pythae's alike.

Deliberately free of vaelab imports: `pythae_worker.py` runs in its own venv, where vaelab is not installed.

What one training measurement is:
    images/s   images trained on / seconds spent in the training loops of the measured epochs
               (every epoch after the first `warmup_epochs`). A window opens when an epoch's training loop
               starts and closes after its last optimizer step; validation, checkpointing and end-of-epoch
               logging fall between windows and are not counted, for any path.
    peak RSS   the process's resident-set high-water mark (getrusage ru_maxrss) when the last window closes,
               i.e. at the end of training and before any post-training work (figures, model saving)
    delta RSS  that peak minus the RSS just before the path loaded its data and built its model:
               what training added on top of the interpreter and the imported libraries
    peak GPU   torch.cuda.max_memory_allocated() at the same moment (cuda only)
    images/CPU-s  images trained on / CPU seconds the process used in the same windows (all its threads): the
               cost per image, which a busy machine distorts far less than the wall-clock rate
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter, process_time


def rss_mib() -> float:
    """The current resident set size, MiB (Linux: /proc/self/statm; elsewhere the peak, which is all we have)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """The process's RSS high-water mark, MiB. ru_maxrss is in KiB on Linux and in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cuda_synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for queued GPU work, so a clock reading covers it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


class TrainingClock:
    """Sums the training-loop time of the measured epochs and records peak memory when training ends.

    A path calls `start(epoch)` when an epoch's training loop begins and `stop(epoch, images)` after its last
    step (or passes `end`, a perf_counter reading taken after the last step, when its hooks only fire later).
    Epochs below `warmup_epochs` are run but not counted: they hold one-off costs such as allocator growth,
    thread-pool start-up and torch.compile's (re)compilations.
    """

    def __init__(self, warmup_epochs: int, device: str = "cpu"):
        self.warmup_epochs = warmup_epochs
        self.device = device
        self.sync = cuda_synchronizer(device)
        self.baseline_rss_mib = rss_mib()
        self.images = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.epochs = 0
        self._started: float | None = None
        self._cpu_started = 0.0
        self.peak_rss_mib: float | None = None
        self.peak_gpu_mib: float | None = None
        if device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()

    def start(self, epoch: int) -> None:
        if epoch < self.warmup_epochs:
            return
        self.sync()
        self._started, self._cpu_started = perf_counter(), process_time()

    def stop(self, epoch: int, images: int, end: float | None = None) -> None:
        if self._started is None:
            self.read_memory()  # the warm-up epochs' memory counts too
            return
        self.sync()
        self.seconds += (end if end is not None else perf_counter()) - self._started
        self.cpu_seconds += process_time() - self._cpu_started
        self.images += images
        self.epochs += 1
        self._started = None
        self.read_memory()

    def read_memory(self) -> None:
        self.peak_rss_mib = peak_rss_mib()
        if self.device.startswith("cuda"):
            import torch

            self.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20

    def result(self, **extra) -> dict:
        if self.epochs == 0:
            raise RuntimeError("no epoch was measured: is --epochs >= 1?")
        return {
            "images": self.images,
            "seconds": self.seconds,
            "epochs": self.epochs,
            "images_per_s": self.images / self.seconds,
            "images_per_cpu_s": self.images / self.cpu_seconds,
            "peak_rss_mib": self.peak_rss_mib,
            "delta_rss_mib": self.peak_rss_mib - self.baseline_rss_mib,
            "peak_gpu_mib": self.peak_gpu_mib,
            **extra,
        }


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
