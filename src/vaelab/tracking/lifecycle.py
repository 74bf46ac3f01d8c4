"""How a run ends, decided in one place, for a training run, a sweep's parent and a search's trials alike.

    FINISHED   its work returned
    KILLED     Ctrl-C or SIGTERM stopped it (Lightning turns both into a graceful stop and SystemExit)
    KILLED     + the tag optuna.state=PRUNED: a pruner stopped a search trial (MLflow has no PRUNED status)
    FAILED     anything else raised; the reason goes into the tag vaelab.failure
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vaelab.tracking.run import Run

INTERRUPTS = (KeyboardInterrupt, SystemExit)
PRUNED_TAGS = {"optuna.state": "PRUNED"}


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
        return Ending("KILLED", "interrupted (Ctrl-C or SIGTERM)")
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
