"""Bad input fails before any training and before any MLflow run, naming the key, value and what is allowed."""

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from helpers.config import CONF, REPO, make_config
from helpers.processes import run_entry
from vaelab.config import check_command_line, hydra_errors, problems
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
        ("objective=iwae objective.dreg=true posterior=iaf", "objective.dreg"),
        ("objective=iwae objective.dreg=true posterior=planar", "objective.dreg"),
        ("arch=mlp2 prior=vamp", "prior"),
        ("arch=mlp2 arch.latent_dims=[100]", "arch.latent_dims"),
        ("arch=mlp2 arch.latent_dims=[100,0]", "arch.latent_dims"),
        ("arch=mlp2 arch.top_hidden=[]", "arch.top_hidden"),
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
        ("trainer.precision=16-mixed trainer.gradient_clip_val=1.0", "optim.fused"),
        ("scheduler=cosine scheduler.T_max=0.5", "scheduler.T_max"),
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
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["data=nope"], "data='nope': allowed one of ['digits', 'fashion_mnist', 'image_folder', 'mnist']"),
        (["objective=iwae", "objective.k=5", "objective.beta=4"], "objective.beta='4': allowed nowhere"),
        (["model.latnt_dim=8"], "model.latnt_dim='8': allowed nowhere: model has no key latnt_dim"),
        (["model.latent_dim=[8"], "model.latent_dim='[8': allowed Hydra override syntax"),
    ],
)
def test_hydra_composition_errors_are_one_line_naming_the_key_with_exit_status_2(project: Path, overrides, line):
    done = run_entry("train.py", *overrides, root=project, check=False)
    assert done.returncode == 2, done.stderr
    assert line in done.stderr
    assert done.stderr.count("\n") == 2, done.stderr  # "vaelab: invalid config:" and the problem
    assert "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["objective=iwae", "objective.beta=4"], ("objective.beta", "4", "nowhere: objective has no key beta")),
        (["arch=nope"], ("arch", "nope", "one of ['conv', 'mlp', 'mlp2', 'resnet']")),
        (["model.beta=4"], ("model.beta", "4", "nowhere: it moved to objective.beta")),
    ],
)
def test_hydra_errors_become_config_errors(overrides, problem):
    with pytest.raises(ConfigError) as error, hydra_errors():
        make_config(*overrides)
    assert error.value.problems == [problem]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("+model.foo=1", ("model.foo", 1, "nowhere: model has the keys ['latent_dim']")),
        (
            "+objective.k=5",
            ("objective.k", 5, "nowhere: objective has the keys ['_target_', 'beta', 'free_bits', 'kl_warmup_epochs']"),
        ),
        ("+colour=red", ("colour", "red", "nowhere: the config has the keys")),
        ("trainer.max_epochs=2.0", ("trainer.max_epochs", 2.0, "an integer >= 1")),  # strict: 2.0 is not an integer
        ("compile=1", ("compile", 1, "true or false")),
        (
            "objective._target_=vaelab.model.objectives.Nope",
            ("objective._target_", "vaelab.model.objectives.Nope", "one of ['vaelab.model.objectives.Capacity'"),
        ),
    ],
)
def test_unknown_keys_and_wrong_types_are_rejected_by_the_schema(override: str, problem):
    (found,) = problems(make_config(override))
    assert found[:2] == problem[:2]
    assert found[2].startswith(problem[2])


def test_a_component_option_has_exactly_the_keys_its_constructor_takes():
    """A new option's YAML, its class and its schema agree: nothing the constructor ignores, nothing it lacks."""
    import inspect

    from hydra.utils import get_object

    from vaelab.schema import COMPONENTS

    built_by_vaelab = {"image_shape", "latent_dim", "params_per_channel", "grey_levels", "encoder_outputs"}
    for group, options in COMPONENTS.items():
        targets = {option.model_fields["target"].annotation.__args__[0]: option for option in options}
        files = sorted((CONF / group).glob("*.yaml"))
        assert {make_config(f"{group}={f.stem}")[group]._target_ for f in files} == set(targets), group
        for path, option in targets.items():
            signature = inspect.signature(get_object(path)).parameters.values()
            parameters = {p.name for p in signature if p.kind is p.POSITIONAL_OR_KEYWORD} - built_by_vaelab
            keys = set(option.model_fields) - {"target"}
            assert keys == parameters, (group, path)


@pytest.mark.subprocess
def test_dvc_params_yaml_is_checked_by_the_same_schema(project: Path):
    """DVC runs the stages on params.yaml (no defaults list): a key left over in it is an error, not ignored."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["beta"] = 4.0  # a params.yaml written before objective.beta existed
    params["optim"]["lr_decay"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_entry("prepare.py", "--config-dir", str(project), "--config-name", "params", root=project, check=False)
    assert done.returncode == 2, done.stderr
    assert "model.beta=4.0: allowed nowhere: it moved to objective.beta" in done.stderr
    assert "optim.lr_decay=0.5: allowed nowhere: optim has the keys" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "data").exists()
