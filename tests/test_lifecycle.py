"""How a run ends is decided in one place: FINISHED, KILLED on an interrupt, KILLED and tagged PRUNED for a pruned
trial, FAILED with the reason, in a real MLflow store."""

from contextlib import nullcontext
from pathlib import Path

import pytest

from helpers.config import make_config
from helpers.stores import mlflow_client
from vaelab.tracking.lifecycle import end_run, ending_of, run_lifecycle
from vaelab.tracking.run import Run


class Pruned(Exception):
    """What a search's pruner raises; the lifecycle is told about it, it does not import Optuna."""


def new_run() -> Run:
    return Run.create(make_config("data=digits"), "train", overrides=[], tags={})


def ended(project: Path, run: Run):
    return mlflow_client(project).get_run(run.run_id)


@pytest.mark.parametrize(
    ("error", "status", "failure", "tags"),
    [
        (None, "FINISHED", None, {}),
        (KeyboardInterrupt(), "KILLED", "interrupted (Ctrl-C or SIGTERM)", {"saved": "here"}),
        (SystemExit(143), "KILLED", "interrupted (Ctrl-C or SIGTERM)", {"saved": "here"}),  # Lightning's SIGTERM
        (Pruned("epoch 1"), "KILLED", "Pruned: epoch 1", {"optuna.state": "PRUNED"}),
        (ValueError("no such thing"), "FAILED", "ValueError: no such thing", {}),
    ],
)
def test_a_run_ends_as_its_block_ends(project: Path, error, status: str, failure, tags: dict):
    run = new_run()
    raised = pytest.raises(type(error)) if error else nullcontext()
    with raised, run_lifecycle(run, pruned=(Pruned,), interrupt_tags=lambda: {"saved": "here"}):
        if error:
            raise error
    logged = ended(project, run)
    assert logged.info.status == status
    assert logged.data.tags.get("vaelab.failure") == failure
    assert {key: logged.data.tags[key] for key in tags} == tags
    assert ("saved" in logged.data.tags) == ("saved" in tags)  # only an interrupted run says where its state went


def test_without_the_pruned_exceptions_a_pruned_trial_would_count_as_failed():
    assert ending_of(Pruned("x")).status == "FAILED"
    assert ending_of(Pruned("x"), pruned=(Pruned,)).tags == {"optuna.state": "PRUNED"}


def test_a_reason_of_its_own_replaces_the_errors_text(project: Path):
    run = new_run()
    end_run(run, RuntimeError("2 of 4"), reason="2 of 4 jobs failed", tags={"vaelab.jobs_failed": "2"})
    logged = ended(project, run)
    assert (logged.info.status, logged.data.tags["vaelab.failure"]) == ("FAILED", "2 of 4 jobs failed")
    assert logged.data.tags["vaelab.jobs_failed"] == "2"
