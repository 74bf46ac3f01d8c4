"""Optuna search as a Hydra sweeper (`hydra/sweeper=optuna`): one nested MLflow run per trial, a persistent study that
resumes, failed and pruned trials that do not stop the study, the best trial as a config train.py takes, and search
spaces and sweeper keys checked before anything runs."""

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers.config import CONF, TINY_TRIAL, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.config import problems, search_problems
from vaelab.search.config import compose_config, config_groups
from vaelab.search.driver import search
from vaelab.search.report import best_experiment_yaml
from vaelab.search.space import sweeper_entries, sweeper_space, sweeper_space_problems
from vaelab.tracking.run import PARENT_TAG, Run

# Tiny trials: scikit-learn's digits, one epoch, a small MLP, few importance samples; random sampling, seeded per
# test where it matters, so which trial samples what is fixed.
BASE = [*TINY_TRIAL, "hydra/sweeper/sampler=random"]
ONE_PARAMETER = "objective.beta=interval(0.5,2)"  # the smallest search space: one sweep override


def load_study(project: Path, name: str = "default") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def states(study: optuna.Study) -> list[str]:
    return [trial.state.name for trial in study.trials]


def runs_by_kind(project: Path):
    runs = all_runs(project)
    parents = [r for r in runs if r.data.tags.get("vaelab.kind") == "search"]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return parents, children


def refusal(capsys: pytest.CaptureFixture, overrides: list[str]) -> str:
    """What an in-process search prints on stderr when it refuses `overrides` with exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        search(overrides, CONF)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err, err
    return err


def names_key(err: str, key: str) -> bool:
    """Whether one line of `err` is the problem of `key`: `  <key>=<value>: allowed ...`."""
    return any(line.strip().startswith(f"{key}=") for line in err.splitlines())


@pytest.mark.subprocess
def test_a_search_makes_one_nested_run_per_trial_and_a_rerun_with_more_trials_resumes_it(project: Path):
    # conf/hparams_search/default.yaml's space, two of its keys replaced by sweep overrides and the other two fixed
    # by plain ones (arch.hidden=[64] is in TINY_TRIAL).
    space = ["model.latent_dim=int(interval(2,8))", "objective.beta=tag(log,interval(0.5,2))", "optim.lr=0.001"]
    settings = [*TINY_TRIAL, *space]
    hydra_form = [
        *settings,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra/sweeper/pruner=none",
    ]
    command = ["-m", "hydra/sweeper=optuna", "hparams_search=default", *hydra_form]
    done = run_entry("train.py", *command, "hydra.sweeper.n_trials=4", root=project)

    study = load_study(project)
    assert states(study) == ["COMPLETE"] * 4
    assert done.stdout.count("search: trial ") == 4  # one progress line per finished trial
    for fixed in ("optim.lr is fixed at 0.001", "arch.hidden is fixed at [64]"):
        assert f"search: {fixed} by the command line, not searched" in done.stdout, fixed
    [parent], children = runs_by_kind(project)
    assert parent.info.status == "FINISHED" and len(children) == 4
    tags = parent.data.tags
    assert tags["optuna.study_name"] == "default" and tags["vaelab.search"] == "default"
    assert (
        tags["vaelab.search_space"] == "model.latent_dim: int(interval(2,8))\nobjective.beta: tag(log,interval(0.5,2))"
    )
    assert tags["optuna.storage"] == f"sqlite:///{project / 'optuna.db'}"
    assert (tags["optuna.sampler"], tags["optuna.pruner"]) == ("RandomSampler", "NopPruner")

    by_id = {run.info.run_id: run for run in children}
    for trial in study.trials:  # trial and run link both ways, and the run was trained with the sampled values
        assert set(trial.params) == {"model.latent_dim", "objective.beta"}
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags[PARENT_TAG] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["model.latent_dim"] == str(trial.params["model.latent_dim"])
        assert float(run.data.params["objective.beta"]) == pytest.approx(trial.params["objective.beta"])
        assert float(run.data.params["optim.lr"]) == 0.001
        assert run.data.metrics["val/elbo"] == pytest.approx(trial.value)

    artifacts = artifact_paths(mlflow_client(project), parent.info.run_id)
    assert {
        "trials.csv",
        "plots/optimization_history.png",
        "plots/parallel_coordinate.png",
        "plots/param_importances.png",
        "best/best_default.yaml",
        "best/reproduce.sh",
    } <= artifacts
    assert parent.data.metrics["best/val/elbo"] == pytest.approx(study.best_value)

    # The best trial's config file composes, through train.py's own config, to what that trial trained.
    outputs = project / "outputs" / parent.info.run_id
    best_cfg = make_config(f"hydra.searchpath=[file://{outputs}]", "experiment=best_default")
    assert problems(best_cfg) == []
    assert best_cfg.data.name == "digits" and best_cfg.trainer.max_epochs == 1 and list(best_cfg.arch.hidden) == [64]
    assert best_cfg.optim.lr == 0.001
    assert best_cfg.model.latent_dim == study.best_params["model.latent_dim"]
    assert best_cfg.objective.beta == pytest.approx(study.best_params["objective.beta"])
    assert "python pipelines/train.py data=digits" in (outputs / "reproduce.sh").read_text()

    # The same search, written as the README's pipelines/search.py command with a larger n_trials, runs only the
    # missing trials, into the same study.
    readme_form = [*settings, "search.sampler=random", "search.seed=0", "search.pruner=none", "search.n_trials=6"]
    done = run_entry("search.py", *readme_form, root=project)
    assert "4 finished trials, n_trials=6: running 2 more" in done.stdout
    assert states(load_study(project)) == ["COMPLETE"] * 6
    parents, children = runs_by_kind(project)
    assert len(parents) == 2 and len(children) == 6
    newest = max(parents, key=lambda r: r.info.start_time)
    assert sum(r.data.tags[PARENT_TAG] == newest.info.run_id for r in children) == 2

    # ... and once the study has them all, a rerun trains nothing.
    result = search(["hparams_search=default", *hydra_form, "hydra.sweeper.n_trials=6"], CONF)
    assert result.counts["COMPLETE"] == 6 and result.parent_run_id is None and len(all_runs(project)) == 8

    # A study is one experiment: more trials with other fixed settings would be ranked against these, so they are
    # refused before anything trains, naming what differs.
    longer = [o for o in command if not o.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=2"]
    done = run_entry("train.py", *longer, "hydra.sweeper.n_trials=8", root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "trainer.max_epochs: 1 in the study, 2 here" in done.stderr
    assert "hydra.sweeper.study_name=<name>" in done.stderr
    assert states(load_study(project)) == ["COMPLETE"] * 6 and len(all_runs(project)) == 8


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "flag",
    [
        pytest.param([], id="without -m"),
        pytest.param(["-m"], id="-m"),
    ],
)
def test_hparams_search_alone_asks_train_py_for_a_search(project: Path, flag: list[str]):
    """The form conf/hparams_search/*.yaml documents: `python pipelines/train.py [-m] hparams_search=<name> ...`,
    its sweeper implied. The search reads its keys (and refuses this one) before anything runs."""
    done = run_entry("train.py", *flag, "hparams_search=default", "hydra.sweeper.n_trials=0", root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert names_key(done.stderr, "hydra.sweeper.n_trials"), done.stderr[-2000:]
    assert list(project.iterdir()) == []


@pytest.mark.integration
def test_a_trial_whose_loss_becomes_nan_fails_and_the_study_completes_the_others(project: Path, capsys):
    # Random sampling with seed 0 draws lr = 1e30, 1e-3, 1e30: the absurd rate overflows the weights at once.
    result = search(
        [*BASE, "optim.lr=choice(0.001,1e30)", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0"],
        config_dir=CONF,
    )

    study = load_study(project)
    assert states(study) == ["FAIL", "COMPLETE", "FAIL"]
    assert result.counts == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 2} and result.best_number == 1
    runs = {run.info.run_id: run for run in all_runs(project)}
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        if trial.state == TrialState.FAIL:
            assert trial.params["optim.lr"] == 1e30
            assert "NonFiniteLossError" in trial.user_attrs["failure"]
            assert run.info.status == "FAILED" and "non-finite" in run.data.tags["vaelab.failure"]
        else:
            assert run.info.status == "FINISHED"
    assert runs[result.parent_run_id].info.status == "FINISHED"
    assert "trial 2 FAIL NonFiniteLossError" in capsys.readouterr().out


@pytest.mark.integration
def test_a_nan_objective_is_a_failed_trial_and_run_not_a_crash_and_a_search_with_no_completed_trial_fails(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Training can finish with a NaN validation metric (nan_policy=skip, say): Optuna must not rank it. With no
    trial completed there is no best one: the search exits 1 saying why the first trial failed, its parent FAILED."""

    def train_to_nan(cfg, callbacks=(), parent_run_id=None, pruned=()):
        run = Run.create(cfg, stage="train", overrides=[], tags={}, parent_run_id=parent_run_id)
        run.end("FINISHED")
        return {"val/elbo": math.nan, "run_id": run.run_id}

    monkeypatch.setattr("vaelab.stages.train.train", train_to_nan)
    with pytest.raises(SystemExit) as stopped:
        search([*BASE, ONE_PARAMETER, "hydra.sweeper.n_trials=1"], CONF)

    [trial] = load_study(project).trials
    assert trial.state == TrialState.FAIL and "non-finite val/elbo" in trial.user_attrs["failure"]
    run = mlflow_client(project).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["vaelab.failure"]
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert "1 finished trials of n_trials=1 (0 complete, 0 pruned, 1 fail)" in out and "best trial" not in out
    said = "no trial of study 'default' completed (1 fail); the first failure, trial 0: "
    assert err.splitlines()[-1].startswith(f"search: {said}") and "non-finite val/elbo" in err.splitlines()[-1]
    [parent], _ = runs_by_kind(project)
    assert parent.info.status == "FAILED" and parent.data.tags["vaelab.failure"].startswith(said)


@pytest.mark.integration
def test_an_aggressive_pruner_prunes_a_clearly_worse_trial(project: Path):
    # Seed 11 draws lr = 3e-3, then 1e-5. After one finished trial the median pruner (no warm-up) compares each
    # epoch with it, and a rate 300x too small is far behind after the first epoch.
    search(
        [
            *BASE,
            "trainer.max_epochs=2",
            "optim.lr=choice(0.003,1e-5)",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.seed=11",
            "hydra/sweeper/pruner=median",
            "hydra.sweeper.pruner.n_startup_trials=1",
            "hydra.sweeper.pruner.n_warmup_steps=0",
        ],
        config_dir=CONF,
    )

    good, pruned = load_study(project).trials
    assert (good.state, pruned.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert pruned.params["optim.lr"] == 1e-5 and pruned.last_step == 0
    run = mlflow_client(project).get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["optuna.trial_number"] == "1"


@pytest.mark.subprocess
def test_a_bad_search_space_fails_before_anything_runs_naming_each_key(project: Path):
    done = run_entry(
        "train.py",
        "-m",
        "hydra/sweeper=optuna",
        *BASE,
        "data.batch_size=glob(*)",  # a sweep, but no distribution a sampler draws from
        "objective.beta=interval(2,0.5)",  # low > high
        "optim.lr=tag(log,interval(0,0.01))",  # a log scale from 0
        "model.latnt_dim=int(interval(2,8))",  # no such key
        root=project,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for key in (
        "hydra.sweeper.params.data.batch_size='glob(*)'",
        "hydra.sweeper.params.objective.beta='interval(2,0.5)'",
        "hydra.sweeper.params.optim.lr='tag(log,interval(0,0.01))'",
        "hydra.sweeper.params.model.latnt_dim='int(interval(2,8))'",
    ):
        assert key in done.stderr, key
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


@pytest.mark.parametrize(
    "space",
    [
        ["+search.space={objective.beta:{type:float,low:0.5,high:2}}"],
        ["~search.space", "+search.space={objective.beta:{type:float,low:0.5,high:2}}"],
        ["search.space.model.latent_dim.low=4"],
    ],
)
def test_the_search_alias_refuses_an_old_search_space_pointing_to_the_sweeper_syntax(project: Path, space: list[str]):
    done = run_entry("search.py", *TINY_TRIAL, *space, root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"vaelab: {space[0]}: a search space is hydra.sweeper.params in Hydra's sweeper syntax" in done.stderr
    assert "'objective.beta=tag(log,interval(0.5,4))'" in done.stderr  # how to write it now
    assert list(project.iterdir()) == []


@pytest.mark.integration  # each case composes a multirun in process (about a second), and trains nothing
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials"),
        # a config names classes to build: only Optuna's pruners
        (["hydra.sweeper.pruner._target_=os.system"], "hydra.sweeper.pruner._target_"),
        (["hydra.sweeper.direction=minimize"], "hydra.sweeper.direction"),  # val/elbo is higher-is-better
        (["hydra.sweeper.metric=test/elbo"], "hydra.sweeper.metric"),  # test numbers never choose a model
        (["hydra.sweeper.storage=optuna.db"], "hydra.sweeper.storage"),  # not an SQLAlchemy URL
        (["data.batch_size=glob(*)"], "hydra.sweeper.params.data.batch_size"),  # not a distribution
        (["objective.beta=interval(2,0.5)"], "hydra.sweeper.params.objective.beta"),  # low > high
        (["optim.lr=tag(log,interval(0,0.01))"], "hydra.sweeper.params.optim.lr"),  # a log scale from 0
        (["model.latnt_dim=int(interval(2,8))"], "hydra.sweeper.params.model.latnt_dim"),  # no such key
        (["model.latent_dim=interval(2.5,8)"], "hydra.sweeper.params.model.latent_dim"),  # an integer key
        (["model.latent_dim=int(interval(0,8))"], "hydra.sweeper.params.model.latent_dim"),  # below what it allows
        (["arch=choice(mlp,transformer)"], "hydra.sweeper.params.arch"),  # not an option of the config group
        (
            ["hparams_search=default", "+hydra.sweeper.params.hydra.sweeper.n_trials='int(interval(1,2))'"],
            "hydra.sweeper.params.hydra.sweeper.n_trials",  # a trial cannot vary the search itself
        ),
        (["trainer=ddp_cpu"], "trainer.strategy"),  # every rank would run the whole search again
    ],
)
def test_search_keys_are_checked_before_anything_runs(
    project: Path, capsys: pytest.CaptureFixture, overrides: list[str], key: str
):
    err = refusal(capsys, [*BASE, ONE_PARAMETER, *overrides])
    assert names_key(err, key), err
    assert list(project.iterdir()) == []


def test_every_search_space_in_conf_composes_and_is_valid():
    files = sorted((CONF / "hparams_search").glob("*.yaml"))
    assert files
    groups = config_groups(CONF)
    for file in files:
        cfg = compose_config(CONF, [f"hparams_search={file.stem}", "hydra/sweeper=optuna"], hydra=True)
        sweeper = cfg.hydra.sweeper
        entries = sweeper_entries(sweeper.params)
        assert cfg.hydra.mode.name == "MULTIRUN", file.name  # a search is a multirun, with or without -m
        assert problems(cfg) + search_problems(cfg, sweeper) == [], file.name
        assert sweeper_space_problems(cfg, entries, groups) == [], file.name
        space = sweeper_space(entries)
        assert len(space.params) == len(entries) and space.fixed == [], file.name  # each entry is searched


@pytest.mark.integration
def test_a_plain_override_of_a_searched_key_fixes_it(project: Path, capsys: pytest.CaptureFixture):
    # conf/hparams_search/default.yaml searches latent_dim, beta, lr and arch.hidden (fixed at [64] by TINY_TRIAL).
    result = search(
        [*BASE, "hparams_search=default", "model.latent_dim=3", "optim.lr=0.002", "hydra.sweeper.n_trials=1"], CONF
    )

    out = capsys.readouterr().out
    for key, value in (("model.latent_dim", "3"), ("optim.lr", "0.002"), ("arch.hidden", "[64]")):
        assert f"search: {key} is fixed at {value} by the command line, not searched" in out, key
    [trial] = load_study(project).trials
    assert trial.state == TrialState.COMPLETE and set(trial.params) == {"objective.beta"}
    run = mlflow_client(project).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.params["model.latent_dim"] == "3" and float(run.data.params["optim.lr"]) == 0.002
    parent = mlflow_client(project).get_run(result.parent_run_id)
    assert parent.data.tags["vaelab.search_space"] == "objective.beta: tag(log, interval(0.25, 4.0))"


@pytest.mark.integration
def test_a_space_given_as_hydra_sweeper_params_on_the_command_line_is_searched(project: Path):
    """What the message for a search without a space suggests: `hydra.sweeper.params.<key>`."""
    search([*BASE, "+hydra.sweeper.params.objective.beta='interval(0.5,2)'", "hydra.sweeper.n_trials=1"], CONF)

    [trial] = load_study(project).trials
    assert trial.state == TrialState.COMPLETE and set(trial.params) == {"objective.beta"}


@pytest.mark.integration
def test_a_search_without_a_space_is_refused_saying_how_to_give_one(project: Path, capsys: pytest.CaptureFixture):
    err = refusal(capsys, [*BASE, "hydra.sweeper.n_trials=1"])
    assert names_key(err, "hydra.sweeper.params") and "hparams_search=<name>" in err, err
    assert list(project.iterdir()) == []


def test_the_best_trials_experiment_file_composes_the_same_config_as_its_command_line(tmp_path: Path):
    overrides = [
        "experiment=quick",  # an experiment, group choices, a list, a new key, values
        "arch=conv",
        "arch.hidden=[8,16]",
        "+trainer.limit_val_batches=2",
        "objective.beta=0.5",
        "scheduler=cosine",
    ]
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "best_x.yaml").write_text(best_experiment_yaml(CONF, overrides, "# best\n"))
    assert make_config(f"hydra.searchpath=[file://{tmp_path}]", "experiment=best_x") == make_config(*overrides)
