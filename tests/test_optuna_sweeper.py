"""`hydra/sweeper=optuna`: the search through the door Hydra users know. Hydra resolves it to vaelab's plugin; a
search space in Hydra's sweeper syntax; trials asynchronous (in this process with the basic launcher, n_jobs workers
each claiming trials with joblib) and exactly n_trials in all; any Optuna pruner; one parent run, the sweeper's."""

import runpy
import warnings
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir

from helpers.config import CONF, REPO, TINY_TRIAL
from helpers.processes import run_entry
from helpers.stores import all_runs
from vaelab.sweep.runs import OPTUNA_SWEEPER
from vaelab.tracking.run import PARENT_TAG

ONE_PARAMETER = ["hydra/sweeper=optuna", "objective.beta=interval(0.5,2)", "hydra/sweeper/sampler=random"]


def tiny_search(project: Path, *overrides: str, check: bool = True):
    """`train.py -m` with the optuna sweeper, a one-parameter space and tiny trials, as a user runs it."""
    return run_entry("train.py", "-m", *ONE_PARAMETER, *TINY_TRIAL, *overrides, root=project, check=check)


def load_study(project: Path, name: str = "default") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def sweeper_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", list(overrides), return_hydra_config=True)


def test_hydra_resolves_the_optuna_sweeper_to_vaelabs_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    cfg = sweeper_config("hydra/sweeper=optuna")
    assert cfg.hydra.sweeper._target_ == OPTUNA_SWEEPER
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert OPTUNA_SWEEPER in found
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"


def test_an_hparams_search_file_brings_its_space_settings_pruner_and_multirun_mode():
    cfg = sweeper_config("hydra/sweeper=optuna", "hparams_search=architecture")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.study_name == "architecture"
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.HyperbandPruner"
    assert cfg.hydra.sweeper.params["arch"] == "choice(mlp, conv, resnet)"


def test_choosing_an_hparams_search_on_the_command_line_chooses_the_optuna_sweeper():
    with_search_sweeper = runpy.run_path(str(REPO / "pipelines" / "train.py"), run_name="not_main")[
        "with_search_sweeper"
    ]
    assert with_search_sweeper(["hparams_search=default", "data=digits"])[-1] == "hydra/sweeper=optuna"
    assert with_search_sweeper(["-m", "hparams_search=default"]) == [
        "-m",
        "hparams_search=default",
        "hydra/sweeper=optuna",
    ]
    assert with_search_sweeper(["data=digits"]) == ["data=digits"]
    assert with_search_sweeper(["hparams_search=null"]) == ["hparams_search=null"]
    chosen = ["hydra/sweeper=optuna", "hparams_search=default"]
    assert with_search_sweeper(chosen) == chosen


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ([], ["hparams_search=default"]),
        (["search=architecture"], ["hparams_search=architecture"]),
        (["search.n_trials=4"], ["hparams_search=default", "hydra.sweeper.n_trials=4"]),
        (
            ["search.pruner=none", "search.sampler=random"],
            ["hparams_search=default", "hydra/sweeper/pruner=none", "hydra/sweeper/sampler=random"],
        ),
        (["search.seed=3"], ["hparams_search=default", "hydra.sweeper.sampler.seed=3"]),
        (
            ["search.pruner_options.median.n_warmup_steps=2"],
            ["hparams_search=default", "hydra.sweeper.pruner.n_warmup_steps=2"],
        ),
        (
            ["data=digits", "search.storage=sqlite:///x.db"],
            ["hparams_search=default", "data=digits", "hydra.sweeper.storage=sqlite:///x.db"],
        ),
    ],
)
def test_search_py_is_an_alias_of_the_hydra_form(old: list[str], new: list[str]):
    hydra_form = runpy.run_path(str(REPO / "pipelines" / "search.py"), run_name="not_main")["hydra_form"]
    assert hydra_form(old) == ["-m", "hydra/sweeper=optuna", *new]


@pytest.mark.subprocess
def test_two_joblib_workers_share_the_study_and_stop_at_exactly_n_trials_under_one_parent(project: Path):
    done = tiny_search(
        project,
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.n_trials=3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert "search: 2 worker(s) on hydra/launcher=joblib" in done.stdout
    study = load_study(project)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    workers = {trial.user_attrs["worker"] for trial in study.trials}
    assert len(workers) == 2  # both worker processes claimed trials

    runs = all_runs(project)
    parents = [r for r in runs if r.data.tags.get("vaelab.kind") in ("search", "sweep")]
    assert [p.data.tags["vaelab.kind"] for p in parents] == ["search"]  # the sweeper's, and no sweep parent
    [parent] = parents
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert parent.data.tags["vaelab.workers"] == "1"  # one command; its launcher's workers log under its parent
    assert "n_trials=3" in done.stdout and "best trial" in done.stdout

    # The report's plots are the study's artifacts too, where `make dashboard` shows them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        uploaded = {meta.filename for meta in optuna.artifacts.get_all_artifact_meta(study)}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= uploaded
    assert len(list((project / "optuna_artifacts").iterdir())) == len(uploaded)


@pytest.mark.subprocess
def test_any_optuna_pruner_can_be_configured_and_its_pruned_trials_are_tagged_so(project: Path):
    # ThresholdPruner(lower=0) prunes at the first epoch every trial whose val/elbo (a negative number) is below 0.
    done = tiny_search(
        project,
        "trainer.max_epochs=2",
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=0",
        "hydra.sweeper.n_trials=2",
    )
    assert [t.state.name for t in load_study(project).trials] == ["PRUNED", "PRUNED"]
    assert done.stdout.count("PRUNED at epoch 0") == 2
    # No best trial, but nothing failed: the command exits 0 (tiny_search checks) and says why there is no best.
    assert "search: no best trial: the pruner stopped every trial (see hydra.sweeper.pruner)" in done.stdout
    children = [r for r in all_runs(project) if PARENT_TAG in r.data.tags]
    assert len(children) == 2
    assert all(r.data.tags["optuna.state"] == "PRUNED" and r.info.status == "KILLED" for r in children)
    [parent] = [r for r in all_runs(project) if r.data.tags.get("vaelab.kind") == "search"]
    assert parent.data.tags["optuna.pruner"] == "ThresholdPruner"


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer=ddp_cpu"], "trainer.strategy"),
        (["hydra.sweeper.n_jobs=2"], "hydra.sweeper.n_jobs"),  # several workers need an out-of-process launcher
        (["hydra.sweeper.sampler._target_=os.system"], "hydra.sweeper.sampler._target_"),
        (["model.latent_dimm=int(interval(2,8))"], "hydra.sweeper.params.model.latent_dimm"),
        (["objective.beta=interval(-1,2)"], "hydra.sweeper.params.objective.beta"),
    ],
)
def test_a_search_that_cannot_run_as_asked_is_refused_before_anything_is_written(
    project: Path, overrides: list[str], key: str
):
    done = tiny_search(project, *overrides, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert key in done.stderr and "Traceback" not in done.stderr
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


def test_a_trial_whose_launcher_worker_has_ended_is_failed_at_once_and_a_live_workers_is_not(tmp_path: Path):
    import os
    import socket
    import subprocess
    import sys

    from vaelab.search.study import WORKER_ATTR, fail_trials_of_ended_workers

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    of_ended, of_live = study.ask(), study.ask()
    of_ended.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{ended.stdout.strip()}")
    of_live.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")

    assert fail_trials_of_ended_workers(study, None, KeyboardInterrupt()) == [of_ended.number]
    states = {t.number: (t.state.name, t.user_attrs.get("failure")) for t in study.trials}
    assert states[of_ended.number] == ("FAIL", "interrupted (Ctrl-C or SIGTERM)")
    assert states[of_live.number] == ("RUNNING", None)
