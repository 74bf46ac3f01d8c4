"""Where a training run's wall time goes, phase by phase, logged with the run as `time/<phase>_s` metrics.

A sweep of small models spends most of its time outside the training loop (setting up, estimating, drawing,
logging); these metrics show how much, per run, in the MLflow UI and to benchmarks/sweeps.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

# In the order a run goes through them.
PHASES = ("setup", "fit", "estimates", "figures", "model_logging", "publish", "evaluation")
PREFIX = "time/"


class Phases:
    """Wall seconds spent in each named phase; a phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        began = perf_counter()
        try:
            yield
        finally:
            self.add(name, perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        """{"time/<phase>_s": seconds} for each phase the run went through."""
        return {f"{PREFIX}{name}_s": seconds for name, seconds in self.seconds.items()}
