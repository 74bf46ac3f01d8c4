"""Where a training run's wall time goes, phase by phase, logged with the run as `time/<phase>_s` metrics.

A sweep of small models spends most of its time outside the training loop (setting up, estimating, drawing,
logging); these metrics show how much, per run, in the MLflow UI and to benchmarks/sweeps.py. Where stdout is not a
terminal, each phase is also announced, `phase <name> ...` as it starts and `phase <name> done in 1.2 s` as it ends, so
a log says what the run is doing (in a terminal the bars do).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

from vaelab.stages.progress import is_terminal

# In the order a run goes through them.
PHASES = ("setup", "fit", "estimates", "figures", "model_logging", "publish", "evaluation")
PREFIX = "time/"


class Phases:
    """Wall seconds spent in each named phase; a phase entered twice adds up.

    `announce`: print a line as each phase starts and ends. By default where stdout is not a terminal, by the only
    process or rank zero (under DDP every rank goes through setup and fit)."""

    def __init__(self, announce: bool | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.announce = (not is_terminal() and is_rank_zero()) if announce is None else announce

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.say(f"phase {name} ...")
        began = perf_counter()
        finished = False
        try:
            yield
            finished = True
        finally:
            # A phase cut short by an error still counts its time, but is not said to be done.
            self.add(name, perf_counter() - began, done=finished)

    def add(self, name: str, seconds: float, done: bool = True) -> None:
        """Count `seconds` more in phase `name`; `done`: announce that it ended (it is over, and went well)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if done:
            self.say(f"phase {name} done in {seconds:.1f} s")

    def say(self, line: str) -> None:
        if self.announce:
            print(line, flush=True)

    def metrics(self) -> dict[str, float]:
        """{"time/<phase>_s": seconds} for each phase the run went through."""
        return {f"{PREFIX}{name}_s": seconds for name, seconds in self.seconds.items()}


def is_rank_zero() -> bool:
    """Is this process rank zero, or the only one? Known before the Trainer starts: read as Lightning reads it from
    the environment its launcher, torchrun or SLURM sets (the first of RANK, LOCAL_RANK, SLURM_PROCID and
    JSM_NAMESPACE_RANK), without importing Lightning, which the evaluate stage does not."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name) is not None:
            return int(os.environ[name]) == 0
    return True
