"""Real faults for the fault-matrix tests, injected through a Lightning callback that the config adds like any other.

A trial's config gets it through the `callbacks` key (with tests/ on PYTHONPATH), and learns its trial number from
the run name the search gives each trial (`<study>/trial-<n>`):

    '+callbacks.faults={_target_:helpers.faults_callbacks.InjectFaults,run_name:${tracking.run_name},kill:[0]}'

Nothing is simulated: `kill` SIGKILLs the training process, `fail` raises from inside the training loop, and `nan`
overwrites the weights with NaN so that the next loss is NaN and `nan_policy` decides. Faults are chosen by trial
number, either listed (`kill: [0]`) or drawn, reproducibly, for a fraction `rate` of all trials (`seed`). They
strike mid-epoch (`at: batch`), or as fitting starts (`at: fit_start`), before the search's own callbacks have
linked the new MLflow run to its trial.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import sys
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import Callback

KINDS = ("fail", "nan", "kill")
AT_BATCH = 1  # mid-epoch: the run exists and is linked to its trial, and one optimizer step is done
MOMENTS = ("batch", "fit_start")


def trial_number(run_name: str | None) -> int | None:
    found = re.search(r"trial-(\d+)$", run_name or "")
    return int(found.group(1)) if found else None


def drawn_fault(seed: int, trial: int, rate: float) -> str | None:
    """The fault trial `trial` gets when a fraction `rate` of trials fail, each kind equally often. A string seed
    makes the draw the same in every process (Python hashes strings differently per process, random does not)."""
    draw = random.Random(f"{seed}:{trial}")
    return draw.choice(KINDS) if draw.random() < rate else None


class InjectFaults(Callback):
    def __init__(
        self,
        run_name: str | None = None,
        kill: Sequence[int] = (),
        fail: Sequence[int] = (),
        nan: Sequence[int] = (),
        rate: float = 0.0,
        seed: int = 0,
        at: str = "batch",
    ):
        if at not in MOMENTS:
            raise ValueError(f"at={at!r}: one of {MOMENTS}")
        self.at = at
        self.trial = trial_number(run_name)
        listed = {**{n: "kill" for n in kill}, **{n: "fail" for n in fail}, **{n: "nan" for n in nan}}
        self.fault = None
        if self.trial is not None:
            self.fault = listed.get(self.trial) or drawn_fault(seed, self.trial, rate)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.at == "fit_start":
            self.inject(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.at == "batch" and batch_idx == AT_BATCH:
            self.inject(pl_module)

    def inject(self, pl_module) -> None:
        if self.fault is None:
            return
        print(
            f"faults: injecting {self.fault} into trial {self.trial} (pid {os.getpid()})", file=sys.stderr, flush=True
        )
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "fail":
            raise RuntimeError(f"injected fault in trial {self.trial}")
        with torch.no_grad():
            for weight in pl_module.parameters():
                weight.fill_(math.nan)
