"""Optuna search: one nested MLflow run per trial, a persistent study that resumes, failed and pruned trials that
do not stop the study, the best trial as a config train.py takes, and search spaces checked before anything runs."""

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers.config import CONF, TINY_TRIAL, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.config import problems, search_problems
from vaelab.errors import ConfigError
from vaelab.search.config import config_groups
from vaelab.search.driver import search
from vaelab.search.report import best_experiment_yaml
from vaelab.search.space import space_problems
from vaelab.tracking.run import PARENT_TAG, Run

# Tiny trials: scikit-learn's digits, one epoch, a small MLP, few importance samples.
BASE = [*TINY_TRIAL, "search.sampler=random"]  # seeded below: which trial samples what is fixed


def space(**params: str) -> list[str]:
    """Overrides that replace the search space: space(objective__beta="{type:float,low:0.5,high:2}")."""
    entries = ",".join(f"{name.replace('__', '.')}:{spec}" for name, spec in params.items())
    return ["~search.space", f"+search.space={{{entries}}}"]


def load_study(project: Path, name: str = "default") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def states(study: optuna.Study) -> list[str]:
    return [trial.state.name for trial in study.trials]


def runs_by_kind(project: Path):
    runs = all_runs(project)
    parents = [r for r in runs if r.data.tags.get("vaelab.kind") == "search"]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return parents, children


@pytest.mark.subprocess
def test_a_search_makes_one_nested_run_per_trial_and_a_rerun_with_more_trials_resumes_it(project: Path):
    command = [
        *BASE,
        *space(model__latent_dim="{type:int,low:2,high:8}", objective__beta="{type:float,low:0.5,high:2,log:true}"),
        "search.seed=0",
        "search.pruner=none",
    ]
    done = run_entry("search.py", *command, "search.n_trials=4", root=project)

    study = load_study(project)
    assert states(study) == ["COMPLETE"] * 4
    assert done.stdout.count("search: trial ") == 4  # one progress line per finished trial
    [parent], children = runs_by_kind(project)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.tags["optuna.study_name"] == "default"
    assert "latent_dim" in parent.data.tags["vaelab.search_space"]
    assert parent.data.tags["optuna.storage"] == f"sqlite:///{project / 'optuna.db'}"

    by_id = {run.info.run_id: run for run in children}
    for trial in study.trials:  # trial and run link both ways, and the run was trained with the sampled values
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags[PARENT_TAG] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["model.latent_dim"] == str(trial.params["model.latent_dim"])
        assert float(run.data.params["objective.beta"]) == pytest.approx(trial.params["objective.beta"])
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
    assert best_cfg.model.latent_dim == study.best_params["model.latent_dim"]
    assert best_cfg.objective.beta == pytest.approx(study.best_params["objective.beta"])
    assert "python pipelines/train.py data=digits" in (outputs / "reproduce.sh").read_text()

    # The same command with a larger n_trials runs only the missing trials, into the same study.
    done = run_entry("search.py", *command, "search.n_trials=6", root=project)
    assert "4 finished trials, search.n_trials=6: running 2 more" in done.stdout
    assert states(load_study(project)) == ["COMPLETE"] * 6
    parents, children = runs_by_kind(project)
    assert len(parents) == 2 and len(children) == 6
    newest = max(parents, key=lambda r: r.info.start_time)
    assert sum(r.data.tags[PARENT_TAG] == newest.info.run_id for r in children) == 2

    # ... and once the study has them all, a rerun trains nothing.
    result = search([*command, "search.n_trials=6"], CONF)
    assert result.counts["COMPLETE"] == 6 and result.parent_run_id is None and len(all_runs(project)) == 8

    # A study is one experiment: more trials with other fixed settings would be ranked against these, so they are
    # refused before anything trains, naming what differs.
    longer = [o for o in command if not o.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=2"]
    done = run_entry("search.py", *longer, "search.n_trials=8", root=project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "trainer.max_epochs: 1 in the study, 2 here" in done.stderr and "search.study_name=<name>" in done.stderr
    assert states(load_study(project)) == ["COMPLETE"] * 6 and len(all_runs(project)) == 8


@pytest.mark.integration
def test_a_trial_whose_loss_becomes_nan_fails_and_the_study_completes_the_others(project: Path, capsys):
    # Random sampling with seed 0 draws lr = 1e30, 1e-3, 1e30: the absurd rate overflows the weights at once.
    result = search(
        [*BASE, *space(optim__lr="{type:categorical,choices:[0.001,1e30]}"), "search.n_trials=3", "search.seed=0"],
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
def test_a_nan_objective_is_a_failed_trial_and_run_not_a_crash(project: Path, monkeypatch: pytest.MonkeyPatch):
    """Training can finish with a NaN validation metric (nan_policy=skip, say): Optuna must not rank it."""

    def train_to_nan(cfg, callbacks=(), parent_run_id=None, pruned=()):
        run = Run.create(cfg, stage="train", overrides=[], tags={}, parent_run_id=parent_run_id)
        run.end("FINISHED")
        return {"val/elbo": math.nan, "run_id": run.run_id}

    monkeypatch.setattr("vaelab.stages.train.train", train_to_nan)
    result = search([*BASE, *space(objective__beta="{type:float,low:0.5,high:2}"), "search.n_trials=1"], CONF)

    [trial] = load_study(project).trials
    assert trial.state == TrialState.FAIL and "non-finite val/elbo" in trial.user_attrs["failure"]
    run = mlflow_client(project).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["vaelab.failure"]
    assert result.best_number is None and result.counts["FAIL"] == 1


@pytest.mark.integration
def test_an_aggressive_pruner_prunes_a_clearly_worse_trial(project: Path):
    # Seed 11 draws lr = 3e-3, then 1e-5. After one finished trial the median pruner (no warm-up) compares each
    # epoch with it, and a rate 300x too small is far behind after the first epoch.
    search(
        [
            *BASE,
            "trainer.max_epochs=2",
            *space(optim__lr="{type:categorical,choices:[0.003,1e-5]}"),
            "search.n_trials=2",
            "search.seed=11",
            "search.pruner=median",
            "search.pruner_options.median.n_startup_trials=1",
            "search.pruner_options.median.n_warmup_steps=0",
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
        "search.py",
        *BASE,
        *space(
            model__latent_dim="{type:fancy,low:2,high:8}",
            objective__beta="{type:float,low:2,high:0.5}",
            optim__lr="{type:float,low:0,high:0.01,log:true}",
            model__latnt_dim="{type:int,low:2,high:8}",
        ),
        root=project,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for key in (
        "search.space.model.latent_dim.type='fancy'",
        "search.space.objective.beta.low=2",
        "search.space.optim.lr.low=0",
        "search.space.model.latnt_dim",
    ):
        assert key in done.stderr, key
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["search.n_trials=0"], "search.n_trials"),
        (["search.pruner=best"], "search.pruner"),
        (["search.direction=minimize"], "search.direction"),  # val/elbo is higher-is-better
        (["search.metric=test/elbo"], "search.metric"),  # test numbers never choose a model
        (["search.storage=optuna.db"], "search.storage"),
        (["search.space.model.latent_dim.type=float"], "search.space.model.latent_dim.type"),  # an integer key
        (["search.space.model.latent_dim.low=0"], "search.space.model.latent_dim.low"),  # outside what it allows
        (
            ["~search.space.arch", "+search.space.arch={type:categorical,choices:[mlp,transformer]}"],
            "search.space.arch",
        ),
        (["+search.space.search.n_trials={type:int,low:1,high:2}"], "search.space.search.n_trials"),
        (["trainer=ddp_cpu"], "trainer.strategy"),  # every rank would run the whole search again
    ],
)
def test_search_keys_are_checked(overrides: list[str], key: str):
    cfg = make_config("search=default", *overrides)
    found = search_problems(cfg) + space_problems(cfg, config_groups(CONF))
    assert any(k.startswith(key) for k, _, _ in found), found


def test_every_search_space_in_conf_is_valid():
    for file in sorted((CONF / "search").glob("*.yaml")):
        cfg = make_config(f"search={file.stem}")
        assert search_problems(cfg) + space_problems(cfg, config_groups(CONF)) == [], file.name


def test_a_searched_key_cannot_also_be_fixed_on_the_command_line(project: Path):
    with pytest.raises(Exception, match="objective.beta is searched"):
        search(["objective.beta=2", *space(objective__beta="{type:float,low:0.5,high:2}")], CONF)
    with pytest.raises(ConfigError, match="search.n_trials"):
        search(["search.n_trials=-1"], CONF)


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
