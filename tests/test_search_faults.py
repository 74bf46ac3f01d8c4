"""Search workers under faults: real worker processes (`pipelines/train.py -m hydra/sweeper=optuna`, one command
each) sharing one sqlite Optuna study and one sqlite MLflow store, with real faults injected through a Lightning
callback (tests/helpers/faults_callbacks.py).

Whatever happens to the workers, the study ends with exactly hydra.sweeper.n_trials trials of its own, each COMPLETE,
PRUNED or FAIL, plus one retry per trial whose worker died; MLflow holds one child run per trial, in the matching
state, under one parent run; and nothing is left RUNNING in either store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers.config import CONF, REPO, TINY_TRIAL
from helpers.processes import subprocess_env
from helpers.stores import all_runs
from vaelab.search.driver import search
from vaelab.search.study import WORKER_ATTR, retry_of
from vaelab.search.workers import PARENT_ATTR
from vaelab.tracking.run import PARENT_TAG

TESTS = Path(__file__).resolve().parent

# Tiny trials (scikit-learn's digits, one epoch, a small MLP), one sampled value, quick heartbeats: a worker that
# dies is noticed after 4 s instead of 3 minutes.
WORKER = [
    *TINY_TRIAL,
    "objective.beta=interval(0.5,2)",
    "hydra/sweeper/sampler=random",
    "hydra/sweeper/pruner=none",
    "hydra.sweeper.heartbeat_interval=1",
    "hydra.sweeper.grace_period=4",
]
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # MLflow has no PRUNED


def faults(**options: object) -> str:
    """The override that adds the fault-injecting callback: faults(kill="[0]"), faults(rate=0.2, seed=1)."""
    entries = "".join(f",{key}:{value}" for key, value in options.items())
    target = "helpers.faults_callbacks.InjectFaults"
    return f"+callbacks.faults={{_target_:{target},run_name:${{tracking.run_name}}{entries}}}"


def start_worker(project: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    """`python pipelines/train.py -m hydra/sweeper=optuna <overrides>` against `project`, its output in `log`; tests/
    on PYTHONPATH for the callback."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / "train.py"), "-m", "hydra/sweeper=optuna", *overrides],
            cwd=project,
            env=subprocess_env(VAELAB_ROOT=str(project), PYTHONPATH=path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait(worker: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        raise


def load_study(project: Path) -> optuna.Study:
    return optuna.load_study(study_name="default", storage=f"sqlite:///{project / 'optuna.db'}")


def check_stores(project: Path, study: optuna.Study):
    """Both stores agree and are at rest: every trial finished, one child run per trial in its state under the
    study's one parent run (FINISHED), nothing RUNNING. Returns the parent and the children by trial number."""
    trials = study.trials
    assert {trial.state.name for trial in trials} <= set(RUN_STATUS), [(t.number, t.state.name) for t in trials]
    runs = all_runs(project)
    assert [run.info.run_id for run in runs if run.info.status == "RUNNING"] == []
    [parent] = [run for run in runs if run.data.tags.get("vaelab.kind") == "search"]
    assert parent.info.status == "FINISHED" and study.user_attrs[PARENT_ATTR] == parent.info.run_id
    children = {run.info.run_id: run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id}
    by_trial = {trial.number: children[trial.user_attrs["mlflow_run_id"]] for trial in trials}
    assert len(children) == len(trials) == len({run.info.run_id for run in by_trial.values()})
    for trial in trials:
        run = by_trial[trial.number]
        assert run.info.status == RUN_STATUS[trial.state.name], (trial.number, trial.state.name, run.info.status)
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["optuna.state"] == "PRUNED"
        if trial.state == TrialState.FAIL:
            assert run.data.tags["vaelab.failure"]
    return parent, by_trial


@pytest.mark.subprocess
def test_two_workers_started_together_on_a_new_study_share_it_and_stop_at_exactly_n_trials(
    project: Path, tmp_path: Path
):
    command = [*WORKER, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0"]
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(project, command, log) for log in logs]  # no optuna.db, no mlflow.db yet
    codes = [wait(worker) for worker in workers]

    outputs = [log.read_text() for log in logs]
    for code, output in zip(codes, outputs, strict=True):
        assert code == 0, output[-4000:]
        assert "IntegrityError" not in output and "Traceback" not in output, output[-4000:]
    study = load_study(project)
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 3
    assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) == 2  # both ran trials
    assert len({trial.params["objective.beta"] for trial in study.trials}) == 3  # the seeded workers drew apart
    parent, _ = check_stores(project, study)
    assert parent.data.tags["vaelab.workers"] == "2" and parent.data.metrics["search/complete"] == 3
    assert sum("joining MLflow parent run" in output for output in outputs) == 1


@pytest.mark.subprocess
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_killed_workers_trial_fails_is_retried_and_its_run_is_closed_by_the_next_worker(
    project: Path, tmp_path: Path
):
    command = [*WORKER, "hydra.sweeper.n_trials=1", faults(kill="[0]")]
    log = tmp_path / "workers.log"
    assert wait(start_worker(project, command, log)) == -signal.SIGKILL

    # What the dead worker left: a RUNNING trial, linked to a RUNNING child run of a RUNNING parent.
    [killed] = load_study(project).trials
    assert killed.state == TrialState.RUNNING
    left = {run.info.run_id: run.info.status for run in all_runs(project)}
    assert left[killed.user_attrs["mlflow_run_id"]] == "RUNNING" and set(left.values()) == {"RUNNING"}

    assert wait(start_worker(project, command, log)) == 0, log.read_text()[-4000:]

    # The retry has the dead trial's parameters and says whose retry it is; it is not one of the study's n_trials.
    study = load_study(project)
    dead, retry = study.trials
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry_of(retry) == 0 and retry_of(dead) is None
    assert retry.params == dead.params and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs[WORKER_ATTR] != dead.user_attrs[WORKER_ATTR]

    parent, runs = check_stores(project, study)
    reason = runs[0].data.tags["vaelab.failure"]
    assert "died: no heartbeat for 4 s" in reason and "retried as trial 1" in reason, reason
    assert runs[0].data.tags["optuna.state"] == "FAIL" and runs[1].data.tags["optuna.retry_of"] == "0"
    assert parent.data.tags["vaelab.workers"] == "2"  # the next worker joined the dead one's parent and ended it
    assert parent.data.metrics["search/retries"] == 1 and parent.data.metrics["search/fail"] == 1
    output = log.read_text()
    assert "search: trial 0 FAIL its worker" in output
    summary = "2 finished trials of n_trials=1 (1 complete, 0 pruned, 1 fail; of them retries of trials whose"
    assert f"{summary} worker died: 1)" in output


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_run_that_a_dead_worker_never_linked_to_its_trial_is_closed_when_the_study_ends(
    project: Path, tmp_path: Path
):
    """Killed between creating its MLflow run and linking it to the trial, a worker leaves a RUNNING run that no
    trial names: the last worker out closes it."""
    command = [*WORKER, "hydra.sweeper.n_trials=1", faults(kill="[0]", at="fit_start")]
    log = tmp_path / "workers.log"
    assert wait(start_worker(project, command, log)) == -signal.SIGKILL
    [orphan] = [run for run in all_runs(project) if run.info.run_name == "default/trial-0"]
    assert orphan.info.status == "RUNNING" and "mlflow_run_id" not in load_study(project).trials[0].user_attrs

    assert wait(start_worker(project, command, log)) == 0, log.read_text()[-4000:]
    dead, retry = load_study(project).trials
    assert (dead.state, retry.state, retry_of(retry)) == (TrialState.FAIL, TrialState.COMPLETE, 0)
    runs = {run.info.run_id: run for run in all_runs(project)}
    assert [run_id for run_id, run in runs.items() if run.info.status == "RUNNING"] == []
    closed = runs[orphan.info.run_id]
    assert closed.info.status == "FAILED" and "its worker died" in closed.data.tags["vaelab.failure"]
    assert runs[retry.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    assert f"closed 1 MLflow run(s) left RUNNING by dead workers: ['{orphan.info.run_id}']" in log.read_text()


@pytest.mark.integration  # composes a multirun in process twice, and trains nothing
def test_heartbeat_settings_are_checked_before_anything_runs(project: Path, capsys: pytest.CaptureFixture):
    for overrides, message in (
        (
            ["hydra.sweeper.heartbeat_interval=2", "hydra.sweeper.grace_period=2"],
            "  hydra.sweeper.grace_period=2: allowed an integer > hydra.sweeper.heartbeat_interval (2)\n",
        ),
        (["hydra.sweeper.max_retry=-1"], "  hydra.sweeper.max_retry=-1: allowed an integer >= 0\n"),
    ):
        with pytest.raises(SystemExit) as stopped:
            search([*WORKER, *overrides], CONF)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_soak_two_workers_with_random_faults_leave_both_stores_complete_and_consistent(project: Path, tmp_path: Path):
    """Two workers share a study of 30 trials (15 each, as it happens); 20% of the trials get a fault: an exception
    inside training, a NaN loss, or a SIGKILL of the worker, which a supervisor then restarts. The median pruner
    prunes too."""
    n_trials, rate, seed = 30, 0.2, 46  # seed 46 draws 6 faults among trials 0-29: 2 kills, 2 exceptions, 2 NaN
    replaced = ("hydra/sweeper/pruner=", "hydra.sweeper.grace_period=")  # a config group is chosen once a command
    command = [
        *(override for override in WORKER if not override.startswith(replaced)),
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.sampler.seed=0",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=3",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "hydra.sweeper.grace_period=10",  # two workers on two busy cores: a live heartbeat must never look stale
        faults(rate=rate, seed=seed),
    ]
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(project, command, log) for log in logs]
    kills = restarts = 0
    started = time.monotonic()
    while any(worker is not None for worker in workers):
        assert time.monotonic() - started < 900, "the soak took over 15 minutes"
        for slot, worker in enumerate(workers):
            if worker is None or worker.poll() is None:
                continue
            if worker.returncode == -signal.SIGKILL:  # an injected kill: restart it, as a supervisor would
                kills += 1
                assert restarts < 10, logs[slot].read_text()[-4000:]
                restarts += 1
                workers[slot] = start_worker(project, command, logs[slot])
            else:
                assert worker.returncode == 0, logs[slot].read_text()[-4000:]
                workers[slot] = None
        time.sleep(0.5)
    seconds = time.monotonic() - started

    study = load_study(project)
    trials = study.trials
    parent, runs = check_stores(project, study)
    retries = [trial for trial in trials if retry_of(trial) is not None]
    own = [trial for trial in trials if retry_of(trial) is None]
    assert len(own) == n_trials  # retries aside, the study ran exactly hydra.sweeper.n_trials
    # Each SIGKILLed worker left one trial, which some worker failed and retried with the same parameters.
    died = [trial for trial in trials if "died: no heartbeat" in runs[trial.number].data.tags.get("vaelab.failure", "")]
    assert len(died) == len(retries) == kills >= 1
    for retry in retries:
        before = next(t for t in trials if t.number == retry.user_attrs["retry_of"])
        assert before in died and before.params == retry.params
    causes = Counter()
    for trial in trials:
        if trial.state == TrialState.FAIL:
            failure = runs[trial.number].data.tags["vaelab.failure"]
            cause = "worker died" if trial in died else "NaN loss" if "NonFiniteLoss" in failure else "exception"
            assert cause != "exception" or "injected fault" in failure, failure
            causes[cause] += 1
    assert causes["NaN loss"] >= 1 and causes["exception"] >= 1
    counts = Counter(trial.state.name for trial in trials)
    assert parent.data.metrics["search/retries"] == len(retries)
    assert {f"search/{state.lower()}": float(n) for state, n in counts.items()}.items() <= parent.data.metrics.items()
    by_worker = Counter(trial.user_attrs[WORKER_ATTR] for trial in trials)
    print(
        f"\nsoak: {len(trials)} trials ({n_trials} of the study's own + {len(retries)} retries) in {seconds:.0f} s: "
        f"{counts['COMPLETE']} COMPLETE, {counts['PRUNED']} PRUNED, {counts['FAIL']} FAIL ({dict(causes)}); "
        f"{kills} workers SIGKILLed and restarted; {len(by_worker)} worker processes ran {sorted(by_worker.values())} "
        f"trials; {len(runs)} child runs under one parent (joined {parent.data.tags['vaelab.workers']} times); "
        "nothing RUNNING in Optuna or MLflow"
    )
