"""SIGTERM (what `timeout`, SLURM and container runtimes send) and Ctrl-C, at any point of a process's life: every run
the process owns ends KILLED (a search trial FAIL), a sweep lists the jobs it did not run, the process exits 130
with the command that goes on, and a second signal during that cleanup leaves the stores intact.

The signals are real. tests/helpers/signal_on_entry sends them as a named function is entered, so each test stops
the process at the phase it names instead of guessing the moment with a timer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import TINY, TINY_TRIAL
from helpers.processes import run_entry
from helpers.stores import all_runs
from vaelab.errors import INTERRUPTED_EXIT
from vaelab.tracking import lifecycle
from vaelab.tracking.lifecycle import INTERRUPTED

SIGNAL_ON_ENTRY = Path(__file__).resolve().parent / "helpers" / "signal_on_entry"
TESTS = Path(__file__).resolve().parent


def signalled(*plan: tuple[str, str] | tuple[str, str, int]) -> dict[str, str]:
    """The environment that makes the process send itself `signal` on the `call`-th entry to `at`, for each
    (at, signal[, call]) of `plan`."""
    entries = [{"at": at, "signal": sig, "call": rest[0] if rest else 1} for at, sig, *rest in plan]
    path = os.pathsep.join(filter(None, [str(SIGNAL_ON_ENTRY), str(TESTS), os.environ.get("PYTHONPATH")]))
    return {"VAELAB_TEST_SIGNALS": json.dumps(entries), "PYTHONPATH": path}


def assert_stopped_cleanly(done, hint: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == INTERRUPTED_EXIT, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "signal_on_entry:" in output  # the signal was sent where the test meant it
    assert hint in output, output[-3000:]


def assert_store_intact(root: Path) -> None:
    for database in ("mlflow.db", "optuna.db"):
        if (root / database).exists():
            with sqlite3.connect(root / database) as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def nothing_running(root: Path) -> None:
    assert [r.info.run_id for r in all_runs(root) if r.info.status == "RUNNING"] == []


# The phases after Trainer.fit, where nothing in Lightning listens for a signal.
AFTER_FIT = {
    "the end-of-training estimates": "vaelab.model.estimators:evaluate_images",
    "the figures": "vaelab.figures:save_figures",
    "model logging": "vaelab.stages.export:save_pyfunc",
    "publishing": "vaelab.stages.publish:publish",
}
SLOW = pytest.mark.slow  # the other variants of a case the default tier runs once


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "phase", [pytest.param(phase, marks=() if phase == "the figures" else SLOW) for phase in AFTER_FIT]
)
def test_sigterm_after_training_ends_the_run_killed_and_exits_130_with_the_resume_command(project: Path, phase: str):
    stopped = signalled((AFTER_FIT[phase], "SIGTERM"))
    done = run_entry("train.py", *TINY, "publish=true", root=project, check=False, env=stopped)  # every phase

    [run] = all_runs(project)
    assert_stopped_cleanly(done, f"resume={run.info.run_id}")
    assert "without training again" in done.stderr
    assert run.info.status == "KILLED"
    assert run.data.tags["vaelab.failure"] == INTERRUPTED
    assert_store_intact(project)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_run_stopped_while_finishing_is_finished_by_resume_without_training_again(project: Path):
    at_figures = signalled((AFTER_FIT["the figures"], "SIGINT"))
    stopped = run_entry("train.py", *TINY, "publish=true", root=project, check=False, env=at_figures)
    assert stopped.returncode == INTERRUPTED_EXIT, stopped.stderr[-3000:]
    [run] = all_runs(project)

    run_entry("train.py", f"resume={run.info.run_id}", root=project)  # publishes, as the run was asked to

    [resumed] = all_runs(project)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert "val/nll_iw" in resumed.data.metrics
    assert (project / "models" / "latest" / "run_id").read_text().strip() == run.info.run_id


@pytest.mark.subprocess
def test_sigterm_during_evaluation_leaves_the_trained_run_finished_and_writes_no_partial_results(project: Path):
    run_entry("train.py", *TINY, root=project)
    done = run_entry(
        "evaluate.py", "eval.iw_k=20", root=project, check=False, env=signalled((AFTER_FIT["the figures"], "SIGTERM"))
    )

    assert_stopped_cleanly(done, "pipelines/evaluate.py")
    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    run_folder = project / "outputs" / run.info.run_id
    assert not (run_folder / "eval.json").exists() and not (run_folder / "evaluation").exists()
    assert not list(run_folder.glob(".*"))  # no half-made figure folder left behind
    assert_store_intact(project)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("where", "interrupted_job"),
    [
        (("vaelab.sweep.jobs:run_job", "SIGTERM", 2), None),  # between jobs: job 1 never starts
        pytest.param(("vaelab.figures:save_figures", "SIGTERM", 2), 1, marks=SLOW),  # inside job 1, after its fit
    ],
    ids=["between-jobs", "inside-a-job"],
)
def test_sigterm_in_a_sweep_ends_the_parent_killed_with_what_finished_and_lists_the_jobs_not_run(
    project: Path, where, interrupted_job
):
    done = run_entry("train.py", "-m", *TINY_TRIAL, "objective.beta=1,2,4", root=project, check=False,
                     env=signalled(where))  # fmt: skip

    assert_stopped_cleanly(done, "not run: ")
    assert "job 2 [objective.beta=4]" in done.stderr
    runs = all_runs(project)
    [parent] = [r for r in runs if r.data.tags.get("vaelab.kind") == "sweep"]
    children = {int(r.data.tags.get("vaelab.sweep_job", -1)): r for r in runs if r is not parent}
    assert parent.info.status == "KILLED"
    assert parent.data.tags["vaelab.failure"].startswith(INTERRUPTED)
    assert children[0].info.status == "FINISHED"
    if interrupted_job is None:
        assert parent.data.tags["vaelab.jobs_not_run"] == "1,2"
        assert set(children) == {0}
    else:
        assert parent.data.tags["vaelab.jobs_not_run"] == "2"
        assert children[interrupted_job].info.status == "KILLED"
    summary = (project / "outputs" / parent.info.run_id / "summary.md").read_text()
    assert "NOT RUN" in summary and "FINISHED" in summary
    nothing_running(project)
    assert_store_intact(project)


@pytest.mark.subprocess
def test_sigterm_in_a_search_trial_after_its_fit_fails_the_trial_and_ends_its_runs_killed(project: Path):
    search = [
        "-m",
        "hydra/sweeper=optuna",
        *TINY_TRIAL,
        "objective.beta=interval(0.5,2)",
        "hydra.sweeper.n_trials=2",
        "hydra/sweeper/sampler=random",
        "hydra/sweeper/pruner=none",
    ]
    done = run_entry("train.py", *search, root=project, check=False,
                     env=signalled((AFTER_FIT["the figures"], "SIGTERM")))  # fmt: skip

    assert_stopped_cleanly(done, "rerun the same command to resume the study")
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{project / 'optuna.db'}")
    [trial] = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["failure"] == INTERRUPTED
    runs = {r.info.run_id: r for r in all_runs(project)}
    assert runs[trial.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert {r.info.status for r in runs.values()} == {"KILLED"}  # the trial's run and the parent
    assert_store_intact(project)


@pytest.mark.subprocess
@pytest.mark.parametrize("second", ["SIGTERM", pytest.param("SIGINT", marks=SLOW)])
def test_a_second_signal_during_the_cleanup_is_ignored_and_the_store_stays_consistent(project: Path, second: str):
    plan = [(AFTER_FIT["the figures"], "SIGTERM"), ("vaelab.tracking.run:Run.end", second)]
    done = run_entry("train.py", *TINY, root=project, check=False, env=signalled(*plan))

    assert_stopped_cleanly(done, "finishing the cleanup first")
    [run] = all_runs(project)
    assert run.info.status == "KILLED"
    assert run.data.tags["vaelab.failure"] == INTERRUPTED
    assert_store_intact(project)


@pytest.mark.subprocess
def test_ctrl_c_while_a_new_store_is_created_exits_130_and_leaves_a_store_the_next_run_uses(project: Path):
    # The 60th statement falls in the migrations that make a new MLflow store, the first seconds of a first run; an
    # empty cache folder makes the run make its store that way (not copy the empty store made once, as it may).
    during_creation = ("sqlalchemy.engine.default:DefaultDialect.do_execute", "SIGINT", 60)
    env = {**signalled(during_creation), "XDG_CACHE_HOME": str(project / "cache")}
    done = run_entry("train.py", *TINY, root=project, check=False, env=env)

    assert_stopped_cleanly(done, "vaelab: interrupted")
    assert_store_intact(project)
    run_entry("train.py", *TINY, root=project)
    assert [run.info.status for run in all_runs(project)] == ["FINISHED"]


def test_the_first_stop_signal_raises_keyboard_interrupt_and_later_ones_are_only_reported(monkeypatch, capsys):
    monkeypatch.setattr(lifecycle, "_received", [])
    before = {signum: signal.getsignal(signum) for signum in lifecycle.STOP_SIGNALS}
    try:
        lifecycle.stop_on_signals()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a bytecode boundary for the handler to run at
        os.kill(os.getpid(), signal.SIGINT)  # during the cleanup: reported, not raised
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert lifecycle.stop_signal() == "SIGTERM"
    assert capsys.readouterr().err.count("while stopping; finishing the cleanup first") == 2


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_slow_training_step_ends_the_run_within_that_step_plus_5_s(project: Path):
    # A wide latent layer makes each step take seconds on a CPU; the signal comes half a second into the third.
    big = [*TINY, "model.latent_dim=20000", "arch.hidden=[512]", "data.batch_size=256", "trainer.max_epochs=5"]
    step = "vaelab.training.module:VAEModule.training_step"
    process_started = time.time()
    done = run_entry("train.py", *big, root=project, check=False,
                     env=signalled((step, "SIGTERM", 3, 0.5), (step, "SIGUSR2", 4)))  # fmt: skip
    ended = time.time()

    assert done.returncode == INTERRUPTED_EXIT, done.stderr[-3000:]
    sent = float(re.search(r"SIGTERM at \S+ \(call 3\) at ([\d.]+)", done.stderr).group(1))
    assert "SIGUSR2" not in done.stderr  # no fourth step began
    # A step is at most the time from the start of the process to the signal, over the two and a half steps before it
    step_s = (sent - process_started) / 2.5
    assert ended - sent < step_s + 5, f"took {ended - sent:.1f} s after the signal; a step takes at most {step_s:.1f} s"
    [run] = all_runs(project)
    assert run.info.status == "KILLED"


def test_the_iw_progress_counts_every_latent_sample_even_when_one_image_takes_many_chunks():
    from helpers.config import make_config
    from vaelab.model.estimators import ROWS, evaluate_images
    from vaelab.training.builder import build_vae

    cfg = make_config(*TINY)
    parts = OmegaConf.to_container(cfg, resolve=True)
    vae = build_vae([1, 8, 8], parts["arch"], parts["likelihood"], 4, grey_levels=17).eval()
    images = torch.rand(3, 1, 8, 8).round()
    k = ROWS["cpu"] * 2 + 5  # each image's samples come in three chunks
    counts: list[int] = []
    evaluate_images(vae, images, k=k, on_samples=counts.append)
    assert sum(counts) == 3 * k
    assert len(counts) >= 3 * 3


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "asked",
    # The limits are far below the timed estimates on any machine: what is tested is the refusal, not a speed.
    [
        ["eval.iw_k=100000000", "eval.max_minutes=1"],
        pytest.param(["eval.iw_k=1000", "eval.max_minutes=0.00001"], marks=SLOW),
    ],
    ids=["huge-k", "tight-limit"],
)
def test_an_evaluation_timed_past_eval_max_minutes_is_refused_naming_eval_iw_k(project: Path, asked):
    run_entry("train.py", *TINY, root=project)
    started = time.monotonic()
    done = run_entry("evaluate.py", *asked, root=project, check=False)

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.search(r"eval\.iw_k=\d+: allowed a k whose test NLL fits eval\.max_minutes=", done.stderr), done.stderr
    assert "k <= " in done.stderr
    assert time.monotonic() - started < 120
    assert not list((project / "outputs").glob("*/eval.json"))


@pytest.mark.subprocess
def test_training_whose_val_estimate_would_run_past_eval_max_minutes_is_refused_before_the_run_exists(project: Path):
    done = run_entry("train.py", *TINY, "eval.val_iw_k=100000000", "eval.max_minutes=1", root=project, check=False)

    assert done.returncode == 2, done.stderr[-3000:]
    assert "eval.val_iw_k=100000000: allowed a k whose val NLL fits eval.max_minutes=1" in done.stderr
    assert not (project / "mlflow.db").exists() or all_runs(project) == []


def test_a_slow_training_step_is_warned_about_before_training(monkeypatch, capsys):
    from helpers.config import make_config
    from vaelab.stages import budget
    from vaelab.training.builder import build_vae

    cfg = make_config(*TINY, "trainer.accelerator=cpu")
    parts = OmegaConf.to_container(cfg, resolve=True)
    vae = build_vae([1, 8, 8], parts["arch"], parts["likelihood"], 4, grey_levels=17).eval()
    images = torch.rand(8, 1, 8, 8).round()
    assert budget.warn_if_slow_step(vae, images, cfg) is None  # a small model is not even timed
    monkeypatch.setattr(budget, "TIME_STEP_ABOVE", 0)
    monkeypatch.setattr(budget, "SLOW_STEP_S", 0)
    assert budget.warn_if_slow_step(vae, images, cfg) > 0
    assert "warning: one training step is timed at about" in capsys.readouterr().out


def test_a_stop_signal_during_a_store_call_lets_the_call_finish_and_then_interrupts(monkeypatch, tmp_path: Path):
    # Raised inside SQLAlchemy, the interrupt would leave a half-migrated store or a closed cursor's traceback.
    from vaelab.tracking.store import StoreClient

    monkeypatch.setattr(lifecycle, "_received", [])
    client = StoreClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finished = []

    def interrupted_call():
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0)  # a bytecode boundary: the handler has run by now
        finished.append(client._client.create_experiment("during the signal"))
        return finished[-1]

    before = {signum: signal.getsignal(signum) for signum in lifecycle.STOP_SIGNALS}
    try:
        lifecycle.stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            client._retry(interrupted_call, "creating an experiment")
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert finished and client.get_experiment(finished[0]).name == "during the signal"
    assert lifecycle.stop_signal() == "SIGINT"
