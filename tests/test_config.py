"""Bad input fails before any training and before any MLflow run, naming the key, value and what is allowed."""

from pathlib import Path

import pytest

from conftest import CONF, make_config, run_entry
from vaelab.config import problems


def test_the_default_config_and_every_experiment_are_valid():
    assert problems(make_config()) == []
    for experiment in sorted((CONF / "experiment").glob("*.yaml")):
        assert problems(make_config(f"experiment={experiment.stem}")) == [], experiment.name


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.latent_dim=2.5", "model.latent_dim"),
        ("model.beta=-1", "model.beta"),
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


def test_iwae_rejects_beta_free_bits_and_warmup():
    found = problems(
        make_config("model.iw_samples=5", "model.beta=2", "model.free_bits=0.5", "model.kl_warmup_epochs=3")
    )
    assert {k for k, _, _ in found} == {"model.beta", "model.free_bits", "model.kl_warmup_epochs"}
    assert all("iw_samples > 1" in allowed for _, _, allowed in found)
    assert problems(make_config("model.iw_samples=5")) == []


def test_capacity_rejects_beta_and_iwae_and_dreg_needs_iwae():
    found = problems(make_config("model.capacity.nats=25", "model.beta=4", "model.iw_samples=5"))
    assert {k for k, _, _ in found} == {"model.beta", "model.capacity.nats"}
    assert problems(make_config("model.capacity.nats=25")) == []
    assert [(k, allowed) for k, _, allowed in problems(make_config("model.dreg=true"))] == [
        ("model.dreg", "false unless model.iw_samples > 1 (DReG is a gradient for the IWAE bound)")
    ]
    assert problems(make_config("model.dreg=true", "model.iw_samples=5")) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.latent_dim=0", ["model.latent_dim=0", "an integer >= 1"]),
        ("model.beta=-0.5", ["model.beta=-0.5", "a number >= 0"]),
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


def test_an_unknown_dataset_lists_the_options(project: Path):
    done = run_entry("train.py", "data=nope", root=project, check=False)
    assert done.returncode != 0
    assert "data/nope" in done.stderr and "fashion_mnist" in done.stderr and "digits" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists()
