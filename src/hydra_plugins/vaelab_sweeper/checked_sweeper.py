"""Hydra's basic sweeper (grids from `-m` and `hydra.sweeper.params`, in batches), without composing every job an
extra time before launching it.

Hydra's sweepers compose each job once to check it, and the launcher composes it again to run it: ~0.2 s a job on
one core, a tenth of a small job (benchmarks/README.md). vaelab's sweep callback has already composed every distinct
swept value before the sweep's parent run was created (vaelab.sweep.callback.check_jobs_compose), so a typo stops
the sweep in one line before anything runs; a failure that only a particular combination of values can cause still
stops the sweep, when the launcher composes that job. A sweep the callback cannot expand (a glob over a config
group, say) is checked here as Hydra checks it.

Hydra only instantiates sweepers from its `hydra_plugins` namespace package, hence this package.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class CheckedSweeperConf:
    _target_: str = "hydra_plugins.vaelab_sweeper.checked_sweeper.CheckedSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045 - OmegaConf reads Optional, not `int | None`, on Python 3.9+
    params: Optional[dict[str, str]] = None  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="vaelab", node=CheckedSweeperConf, provider="vaelab")


class CheckedSweeper(BasicSweeper):
    """The basic sweeper, trusting the sweep callback's check of every swept value (see the module's docstring)."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from vaelab.sweep.runs import launched_jobs

        if launched_jobs(self.config.hydra.sweeper, list(self.config.hydra.overrides.task)) is None:
            super().validate_batch_is_legal(batch)  # a sweep the callback could not expand, so did not check
