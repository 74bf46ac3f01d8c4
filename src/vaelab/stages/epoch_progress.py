"""A training run's progress over its epochs where its output is not a terminal: a plain line per epoch in place
of the Rich bar (vaelab.stages.progress says where). Apart from vaelab.stages.progress, which the evaluate stage
uses without Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vaelab.stages.progress import is_terminal

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from vaelab.training.callbacks import EpochHistory


def epoch_progress(callbacks: Sequence[Callback], history: EpochHistory) -> list[Callback]:
    """The callbacks to add to a run's for its progress over the epochs, given the run's own (the configured bar
    among them) and its `history`.

    In a terminal, none: the configured bar draws. Elsewhere, a line per epoch, and the Rich bars among `callbacks`
    are switched off (they would print only their last frame, when training ends). A run configured with no bar
    (`~callbacks.progress`) shows no progress either way."""
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    from vaelab.training.callbacks import EpochLines

    if is_terminal() or not any(isinstance(callback, ProgressBar) for callback in callbacks):
        return []
    for callback in callbacks:
        if isinstance(callback, RichProgressBar):
            callback.disable()
    return [EpochLines(history)]
