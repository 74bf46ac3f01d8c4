"""How a run shows its progress, whether its output goes to a terminal or to a log.

In a terminal, Rich bars redraw in place: Lightning's over the epochs, and a transient one for work outside its loop
(the importance-sampled estimates). Anywhere else (a DVC stage, CI, a redirected or nohup'd run) a Rich bar prints
nothing until it ends, so a run says what it is doing in plain lines instead: one per epoch
(vaelab.training.callbacks.EpochLines) and one as each phase starts and ends (vaelab.stages.phases).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from vaelab.training.callbacks import EpochHistory


def is_terminal() -> bool:
    """Does stdout go to a terminal that a Rich bar redraws in place? The one place this is decided.

    Rich's own answer, so the plain lines appear exactly where its bars would not: stdout is a terminal that is not
    TERM=dumb (or a notebook), unless TTY_INTERACTIVE=0/1, TTY_COMPATIBLE=0/1 or FORCE_COLOR say otherwise."""
    console = Console(file=sys.stdout)
    return console.is_interactive or console.is_jupyter


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`, which moves the bar on by n items; the bar disappears when the block ends. Not a terminal:
    no bar (it would draw nothing but an empty line); the phase around it says what is being done."""
    if not is_terminal():
        yield lambda n: None
        return
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


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
