"""Store calls that a stop signal waits for.

A KeyboardInterrupt raised in the middle of a store call lands inside SQLAlchemy or Alembic: a half-run migration
of a new store, a cursor closed under a fetch. They then log tracebacks of their own, or turn the interrupt into an
error that fails the run instead of ending it KILLED. So while the main thread is inside `deferring_interrupts()`,
the stop-signal handler (vaelab.tracking.lifecycle) hands its KeyboardInterrupt to `defer` instead of raising it,
and the block raises it as it ends. One store call lasts at most sqlite's busy timeout (5 s), so Ctrl-C still stops
a run within seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # how many deferring blocks the main thread is inside
_pending: list[BaseException] = []


def deferring() -> bool:
    """Is the main thread inside a store call, where an interrupt must wait?"""
    return _depth > 0


def defer(interrupt: BaseException) -> None:
    """Raise `interrupt` when the outermost deferring block ends (only the first one is kept)."""
    if not _pending:
        _pending.append(interrupt)


@contextmanager
def deferring_interrupts() -> Iterator[None]:
    """A block a stop signal does not cut short: its interrupt is raised as the block ends. Other threads (the
    system-metrics monitor) never receive signals, so their blocks defer nothing."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            raise _pending.pop()
