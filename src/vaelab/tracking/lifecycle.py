"""How a run ends, decided in one place, for a training run, a sweep's parent and a search's trials alike.

    FINISHED   its work returned
    KILLED     Ctrl-C or SIGTERM stopped it (Lightning turns both into a graceful stop and SystemExit)
    KILLED     + the tag optuna.state=PRUNED: a pruner stopped a search trial (MLflow has no PRUNED status)
    FAILED     anything else raised; the reason goes into the tag vaelab.failure

SIGTERM (what `timeout`, SLURM and container runtimes send) is a Ctrl-C here, for the whole life of a process whose
entry point called `stop_on_signals()`: either one raises KeyboardInterrupt wherever the process is (training, the
end-of-training estimates, figures, model logging, evaluation, a sweep between jobs, a search between trials), so
every block that owns a run ends it KILLED on the way out, and the process exits 130. A second signal while that
cleanup runs is reported and ignored, so the cleanup finishes and leaves the stores consistent (SIGKILL still ends
the process at once; sqlite's transactions keep even that from corrupting a store).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from vaelab.tracking import deferral
from vaelab.tracking.run import Run

INTERRUPTS = (KeyboardInterrupt, SystemExit)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[str] = []  # the stop signals this process has received, by name


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as the Ctrl-C it is handled like."""


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise KeyboardInterrupt (the first one) or are reported and ignored (any later
    one, while the first one's cleanup runs). Only the main thread can install handlers; elsewhere this does nothing.
    Lightning's Trainer keeps this handler while it fits (it calls the handler it found after its own)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_stop_signal)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    if len(_received) > 1:
        print(
            f"vaelab: {name} received while stopping; finishing the cleanup first (SIGKILL ends it at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    interrupt = Terminated(f"stopped by {name}") if signum == signal.SIGTERM else KeyboardInterrupt()
    if deferral.deferring():
        deferral.defer(interrupt)  # raised as the store call under way ends: see vaelab.tracking.deferral
        return
    raise interrupt


def stop_signal() -> str | None:
    """The name of the first stop signal this process received (SIGINT or SIGTERM), if any."""
    return _received[0] if _received else None


PRUNED_TAGS = {"optuna.state": "PRUNED"}
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"  # the vaelab.failure of a KILLED run


@dataclass(frozen=True)
class Ending:
    """A run's final MLflow status, the reason it failed or was stopped, and tags that say more."""

    status: str
    reason: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.status == "KILLED" and not self.tags


def ending_of(error: BaseException | None, pruned: tuple[type[BaseException], ...] = ()) -> Ending:
    """How a run whose work ended with `error` (None: it returned) ends. `pruned`: the exceptions that mean a pruner
    stopped it (the search passes Optuna's, so nothing here imports Optuna)."""
    if error is None:
        return Ending("FINISHED")
    if pruned and isinstance(error, pruned):
        return Ending("KILLED", f"{type(error).__name__}: {error}", PRUNED_TAGS)
    if isinstance(error, INTERRUPTS):
        return Ending("KILLED", INTERRUPTED)
    return Ending("FAILED", f"{type(error).__name__}: {error}")


def end_run(
    run: Run,
    error: BaseException | None = None,
    pruned: tuple[type[BaseException], ...] = (),
    reason: str | None = None,
    tags: dict[str, str] | None = None,
) -> Ending:
    """End `run` as `error` (None: FINISHED) says, with `tags` and the ending's own. `reason` replaces the error's
    text as the run's vaelab.failure (a sweep says which of its jobs failed, say)."""
    return record(run, ending_of(error, pruned), reason, tags)


def record(run: Run, ending: Ending, reason: str | None = None, tags: dict[str, str] | None = None) -> Ending:
    """End `run` with `ending`, see end_run."""
    if ending.tags or tags:
        run.set_tags({**ending.tags, **(tags or {})})
    run.end(ending.status, reason=reason if reason and ending.status != "FINISHED" else ending.reason)
    return ending


@contextmanager
def run_lifecycle(
    run: Run | None,
    pruned: tuple[type[BaseException], ...] = (),
    interrupt_tags: Callable[[], dict[str, str]] | None = None,
) -> Iterator[None]:
    """Ends `run` (if any) by how the block ends, then lets any exception go on. `interrupt_tags()` adds tags to an
    interrupted run (where its state was saved, say)."""
    try:
        yield
    except BaseException as error:
        if run is not None:
            ending = ending_of(error, pruned)
            record(run, ending, tags=interrupt_tags() if interrupt_tags and ending.interrupted else None)
        raise
    if run is not None:
        end_run(run)
