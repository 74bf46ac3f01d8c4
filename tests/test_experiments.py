"""Every named experiment in conf/experiment/ composes, passes validation and trains a few steps on CPU.

The files are discovered, so a new experiment is covered the moment it is added. Each trains on the data it
names: digits as is, Fashion-MNIST prepared once per session, MNIST from a tiny IDX folder via data.root
(it cannot be downloaded here).
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.config import CONF, make_config
from helpers.mnist import mnist_files, write_mnist
from helpers.processes import copy_processed
from helpers.stores import all_runs
from vaelab.config import validate
from vaelab.stages.train import train

EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))

# A few steps, not a result: one epoch on at most 256 images, two val batches, a 2-sample IW estimate.
FEW_STEPS = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "++trainer.limit_val_batches=2",
    "data.limit_train=256",
    "eval.val_iw_k=2",
    "eval.val_limit=64",
]


def test_the_experiments_are_discovered():
    named = {"quick", "fashion_default", "beta_vae", "latent_2d", "conv_iwae", "mnist_burda", "capacity_vae"}
    named |= {"mnist_burda_2layer", "iaf_vamp"}
    assert named <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_file_is_global_and_says_how_to_run_it(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"experiment={name}" in text


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_composes_and_is_valid(name):
    validate(make_config(f"experiment={name}"))


def test_fashion_default_is_exactly_the_default_config():
    # What `dvc repro` trains, named: if a default changes, this file must follow (or stop claiming to be it).
    default = OmegaConf.to_container(make_config())
    assert OmegaConf.to_container(make_config("experiment=fashion_default")) == default


def data_for(name: str, project: Path, tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """Make the experiment's dataset available in `project`; the overrides that point training at it."""
    dataset = make_config(f"experiment={name}").data.name
    if dataset == "fashion_mnist":
        copy_processed(project, request.getfixturevalue("fashion_processed"))  # skips without Debian's package
    elif dataset == "mnist":
        root = write_mnist(tmp_path / "mnist", mnist_files())  # 120 train + 40 test images
        return [f"data.root={root}", "data.val_size=20"]
    return []


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_trains_a_few_steps_on_cpu(name, project: Path, tmp_path: Path, request):
    overrides = [f"experiment={name}", *data_for(name, project, tmp_path, request), *FEW_STEPS]
    cfg = make_config(*overrides)
    summary = train(cfg)

    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    params = run.data.params
    keys = ("data.name", "arch._target_", "model.latent_dim", "objective._target_", "objective.k", "objective.beta")
    for key in keys:
        if OmegaConf.select(cfg, key) is None:
            continue  # a key of another objective
        assert params[key] == str(OmegaConf.select(cfg, key)), key  # the experiment's settings reached the run
    assert summary["val/elbo"] < 0 and summary["val/nll_iw"] > 0
    train_json = json.loads((project / "outputs" / run.info.run_id / "train.json").read_text())
    assert train_json["run_id"] == run.info.run_id
