"""How a run shows its progress, whether its output goes to a terminal or to a log.

In a terminal, Rich bars redraw in place: Lightning's over the epochs, and a transient one for work outside its loop
(the importance-sampled estimates). Anywhere else (a DVC stage, CI, a redirected or nohup'd run) a Rich bar prints
nothing until it ends, so a run says what it is doing in plain lines instead: one per epoch
(vaelab.stages.epoch_progress) and one as each phase starts and ends (vaelab.stages.phases).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress


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
