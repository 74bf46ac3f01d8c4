"""Bad input fails before any training and before any MLflow run, naming the key, value and what is allowed."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from helpers.config import CONF, make_config
from helpers.processes import run_entry
from vaelab.config import check_command_line, problems
from vaelab.errors import ConfigError


def test_the_default_config_and_every_experiment_are_valid():
    assert problems(make_config()) == []
    for experiment in sorted((CONF / "experiment").glob("*.yaml")):
        assert problems(make_config(f"experiment={experiment.stem}")) == [], experiment.name


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.latent_dim=2.5", "model.latent_dim"),
        ("objective.beta=-1", "objective.beta"),
        ("objective.kl_warmup_epochs=1.5", "objective.kl_warmup_epochs"),
        ("objective=iwae objective.k=1", "objective.k"),
        ("objective=iwae objective.dreg=maybe", "objective.dreg"),
        ("objective=capacity objective.gamma=0", "objective.gamma"),
        ("objective=capacity objective.nats=-1", "objective.nats"),
        ("optim.lr=0", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("eval.iw_k=0", "eval.iw_k"),
        ("nan_policy=explode", "nan_policy"),
        ("data.root=/no/such/folder", "data.root"),
        ("tracking.uri=mlruns", "tracking.uri"),
        ("likelihood=gaussian likelihood.variance=diagonal", "likelihood.variance"),
        ("arch=conv arch.hidden=[]", "arch.hidden"),
        ("arch.hidden=[512,0]", "arch.hidden"),
        ("arch=resnet arch.blocks_per_stage=-1", "arch.blocks_per_stage"),
        ("likelihood=gaussian likelihood.min_std=0", "likelihood.min_std"),
        ("optim.fused=maybe", "optim.fused"),
        ("trainer.precision=16-mixed optim.grad_clip=1.0", "optim.fused"),
    ],
)
def test_a_bad_value_is_reported_by_key(override: str, key: str):
    found = problems(make_config(*override.split()))
    assert [k for k, _, _ in found] == [key]


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective=iwae", "objective.beta=2"],
        ["objective=iwae", "objective.free_bits=0.5"],
        ["objective=capacity", "objective.kl_warmup_epochs=3"],
        ["objective=elbo", "objective.k=5"],
    ],
)
def test_an_objective_has_only_its_own_keys_so_a_meaningless_combination_cannot_be_written(overrides):
    with pytest.raises(ConfigCompositionException, match=overrides[1].split("=")[0].split(".")[1]):
        make_config(*overrides)


def test_every_objective_composes_and_is_valid():
    for objective in sorted(p.stem for p in (CONF / "objective").glob("*.yaml")):
        assert problems(make_config(f"objective={objective}")) == [], objective


@pytest.mark.parametrize(
    ("override", "new_place"),
    [
        ("model.beta=4", "objective.beta"),
        ("+model.free_bits=0.5", "objective.free_bits"),
        ("model.iw_samples=5", "objective.k (with objective=iwae)"),
        ("model.capacity.nats=25", "objective.nats (with objective=capacity)"),
        ("~model.dreg", "objective.dreg (with objective=iwae)"),
    ],
)
def test_a_moved_key_on_the_command_line_names_its_new_place(override: str, new_place: str):
    with pytest.raises(ConfigError) as error:
        check_command_line(["-m", "data=digits", override])
    assert f"moved to {new_place}" in str(error.value)
    check_command_line(["-m", "objective.beta=0.5,1", "model.latent_dim=8"])  # the new keys pass


def test_a_moved_key_in_a_config_file_names_its_new_place():
    cfg = make_config()
    with open_dict(cfg):
        cfg.model.beta = 4.0
        cfg.model.capacity = {"nats": 25.0}
    found = {key: allowed for key, _, allowed in problems(cfg)}
    assert found == {
        "model.beta": "nowhere: it moved to objective.beta",
        "model.capacity.nats": "nowhere: it moved to objective.nats (with objective=capacity)",
    }


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.latent_dim=0", ["model.latent_dim=0", "an integer >= 1"]),
        ("objective.beta=-0.5", ["objective.beta=-0.5", "a number >= 0"]),
        ("model.beta=4", ["model.beta='4'", "moved to objective.beta"]),
        ("data.root=/no/such/folder", ["data.root='/no/such/folder'", "an existing directory"]),
    ],
)
def test_the_train_entry_point_exits_plainly_before_creating_a_run(project: Path, override: str, expected):
    done = run_entry("train.py", override, root=project, check=False)
    assert done.returncode == 2
    for text in expected:
        assert text in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (project / "mlflow.db").exists()
    assert not (project / "outputs").exists()


@pytest.mark.subprocess
def test_an_unknown_dataset_lists_the_options(project: Path):
    done = run_entry("train.py", "data=nope", root=project, check=False)
    assert done.returncode != 0
    assert "data/nope" in done.stderr and "fashion_mnist" in done.stderr and "digits" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists()
