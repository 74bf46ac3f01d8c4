"""A transient Rich progress bar for work outside Lightning's loop (the importance-sampled estimates)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`, which moves the bar on by n items; the bar disappears when the block ends."""
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
