"""The fault matrix (docs/faults.md):
the checkpoint rows: evaluate refuses a checkpoint that is not the model asked for, or not
a checkpoint at all, with a plain message naming the file; it never runs code from one; nothing is written or logged.

Every evaluation here is refused, so they share one tiny trained model (mlp [64], latent_dim 4, 1x8x8 digits).
"""

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from helpers.config import REPO, TINY, make_config
from helpers.mnist import mnist_files, write_mnist
from helpers.processes import run_entry
from helpers.stores import all_runs, mlflow_client
from vaelab import paths
from vaelab.checkpoints import load_trained
from vaelab.errors import CheckpointError, ConfigError
from vaelab.params import compose_params
from vaelab.stages.evaluate import evaluate, resolve_checkpoint

TRAINED_WITH = ["arch build_mlp(hidden=[64], activation=silu)", "latent_dim 4", "images 1x8x8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root holding one trained digits model: outputs/<run_id>/, models/latest/ and its MLflow run."""
    root = tmp_path_factory.mktemp("trained")
    run_entry("train.py", *TINY, "trainer.max_epochs=1", "eval.val_limit=50", "publish=true", root=root)
    return root


def run_id_of(root: Path) -> str:
    return (root / "models" / "latest" / "run_id").read_text().strip()


def refused(root: Path, *args: str) -> str:
    """Run evaluate.py, expecting a plain refusal; returns its message. Nothing may be written or logged."""
    done = run_entry("evaluate.py", *args, "eval.iw_k=4", root=root, check=False)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "size mismatch" not in done.stderr, done.stderr[-3000:]
    assert not (root / "metrics" / "eval.json").exists() and not (root / "plots" / "eval").exists()
    assert not list((root / "outputs").glob("*/eval.json")) and not list((root / "outputs").glob("*/evaluation"))
    [run] = all_runs(root)
    assert not any(name.startswith("test/") for name in run.data.metrics)
    return done.stderr


def tampered(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint `source` at `target`, changed by `edit`: still a plain, weights-only checkpoint."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


# -- Row: a checkpoint from another architecture or latent size ---------------------------------------


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("naming", "override", "difference"),
    [
        ("ckpt_file", "model.latent_dim=8", "model.latent_dim: trained with 4; the config asks for 8"),
        ("ckpt_folder", "arch=conv", "arch: trained with {'_target_': 'vaelab.model.networks.build_mlp'"),
        ("run_id", "arch.hidden=[32]", "'hidden': [64]"),
        (
            "models_latest",
            "data=fashion_mnist",
            "data.name: trained with 'digits'; the config asks for 'fashion_mnist'",
        ),
    ],
    ids=["ckpt_file", "ckpt_folder", "run_id", "models_latest"],
)
def test_evaluate_refuses_a_checkpoint_that_is_not_the_model_the_command_line_asks_for(
    trained: Path, naming: str, override: str, difference: str
):
    """Each way of naming a checkpoint, each with a different key the checkpoint was not trained with."""
    run_id = run_id_of(trained)
    checkpoint = {
        "ckpt_file": ["ckpt=" + str(trained / "outputs" / run_id / "checkpoints" / "best.ckpt")],
        "ckpt_folder": ["ckpt=" + str(trained / "outputs" / run_id)],
        "run_id": [f"run_id={run_id}"],
        "models_latest": [],
    }[naming]
    message = refused(trained, *checkpoint, override)
    assert "is not the model this evaluation asks for" in message
    assert difference in message
    assert ".ckpt" in message and all(fact in message for fact in TRAINED_WITH)


@pytest.mark.subprocess
def test_evaluate_under_dvc_refuses_a_model_its_params_file_does_not_describe(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`dvc repro -s evaluate` after params.yaml changed: models/latest is still the old model."""
    monkeypatch.setenv("VAELAB_ROOT", str(REPO))  # compose from the repository's conf/, as `make params` does
    params = compose_params([*TINY, "model.latent_dim=6"], tmp_path / "params.yaml")
    message = refused(
        trained,
        "--config-dir",
        str(params.parent),
        "--config-name",
        "params",
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
    )
    assert "model.latent_dim: trained with 4; the config asks for 6" in message
    assert str(trained / "models" / "latest" / "model.ckpt") in message


@pytest.mark.subprocess
def test_weights_that_do_not_fit_the_checkpoints_own_hyperparameters_are_a_clear_error(trained: Path, tmp_path: Path):
    """Weights of another network under these hyper-parameters: named shapes, not torch's wall of size mismatches."""
    source = trained / "models" / "latest" / "model.ckpt"
    relabelled = tampered(source, tmp_path / "relabelled.ckpt", lambda c: c["hyper_parameters"].update(latent_dim=8))
    message = refused(trained, f"ckpt={relabelled}")
    assert f"{relabelled}: its weights do not fit the network its hyper-parameters describe" in message
    assert "latent_dim 8" in message and "is 8x64 in the file but 16x64 in that network" in message


@pytest.mark.subprocess
def test_a_checkpoint_whose_data_now_holds_other_images_is_named_with_both_shapes(
    trained: Path, project: Path, tmp_path: Path
):
    """The checkpoint's own data settings decide its test images; here they point at 28x28 MNIST files."""
    mnist = write_mnist(tmp_path / "mnist", mnist_files())

    def elsewhere(checkpoint: dict) -> None:
        checkpoint["vaelab"]["data"].update(name="mnist", root=str(mnist), val_size=20, test_size=0)

    moved = tampered(trained / "models" / "latest" / "model.ckpt", tmp_path / "moved.ckpt", elsewhere)
    with pytest.raises(CheckpointError, match=r"moved.ckpt was trained on 1x8x8 images, but .* give 1x28x28 images"):
        evaluate(make_config(f"ckpt={moved}", "logger=none"))


@pytest.mark.subprocess
def test_a_checkpoint_of_another_model_or_without_lineage_is_named_as_such(
    trained: Path, project: Path, tmp_path: Path
):
    source = trained / "models" / "latest" / "model.ckpt"

    def other_model(checkpoint: dict) -> None:
        checkpoint["hyper_parameters"] = {"hidden_size": 128, "num_classes": 10}

    other = tampered(source, tmp_path / "classifier.ckpt", other_model)
    with pytest.raises(CheckpointError, match=r"classifier.ckpt: not a vaelab VAE checkpoint: .* lack image_shape"):
        load_trained(other)
    bare = tampered(source, tmp_path / "bare.ckpt", lambda c: c.pop("vaelab"))
    assert load_trained(bare).hparams.latent_dim == 4  # loads: the network needs no lineage
    with pytest.raises(CheckpointError, match=r"bare.ckpt: has no vaelab lineage"):
        evaluate(make_config(*TINY, f"ckpt={bare}"))
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"ckpt=.*empty: a folder without model.ckpt"):
        evaluate(make_config(*TINY, f"ckpt={folder}"))


def test_with_nothing_published_evaluate_takes_the_newest_finished_training_run_with_a_checkpoint_here(
    project: Path,
):
    """What a direct `train.py` then `evaluate.py` expects; the published model, when there is one, still comes
    first (it is what DVC's evaluate stage evaluates)."""
    from vaelab.stages.evaluate import newest_finished_run
    from vaelab.tracking.store import ensure_experiment, resolve_uri

    uri = resolve_uri(None)
    client = mlflow_client(project)
    experiment_id = ensure_experiment(uri, "vaelab")

    def train_run(status: str, with_checkpoint: bool = True, stage: str = "train") -> str:
        run_id = client.create_run(experiment_id, tags={"vaelab.stage": stage}).info.run_id
        client.set_terminated(run_id, status)
        if with_checkpoint:
            best = paths.best_checkpoint(run_id)
            best.parent.mkdir(parents=True)
            best.write_bytes(b"")
        return run_id

    finished = train_run("FINISHED")
    train_run("FINISHED", with_checkpoint=False)  # trained elsewhere: its checkpoint is not here
    train_run("FAILED")
    train_run("KILLED")
    train_run("FINISHED", stage="sweep")  # a sweep's parent trains nothing
    assert newest_finished_run(make_config()) == finished
    path, asked = resolve_checkpoint(make_config())
    assert path == paths.best_checkpoint(finished)
    assert asked == "the newest finished training run: models/latest/ holds no published model"

    paths.published_model().parent.mkdir(parents=True)
    paths.published_model().write_bytes(b"")
    assert resolve_checkpoint(make_config()) == (paths.published_model(), "the default, models/latest/")


def test_each_way_of_naming_a_checkpoint_says_which_one_is_missing(project: Path):
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(CheckpointError, match=rf"checkpoint not found: .*{unknown}.*best.ckpt \(run_id={unknown}"):
        resolve_checkpoint(make_config(f"run_id={unknown}"))
    nothing = r"models/latest/ holds no published model .*, and experiment 'vaelab' has no finished training run"
    with pytest.raises(CheckpointError, match=nothing):
        resolve_checkpoint(make_config())
    with pytest.raises(CheckpointError, match=r"and logger=none keeps no runs to choose from; pass run_id=<id>"):
        resolve_checkpoint(make_config("logger=none"))
    with pytest.raises(ConfigError, match=r"run_id='\.\./\.\./elsewhere': allowed null, or an MLflow run id"):
        evaluate(make_config("run_id=../../elsewhere"))
    with pytest.raises(ValueError, match="not a run id"):  # even unchecked, a name never leads out of outputs/
        resolve_checkpoint(make_config("run_id=../../elsewhere"))
    with pytest.raises(ConfigError, match=r"ckpt='a.ckpt': allowed null when run_id is given"):
        evaluate(make_config("ckpt=a.ckpt", f"run_id={unknown}"))


# -- Row: a checkpoint file that is not a checkpoint --------------------------------------------------


class RunsCode:
    """Unpickling this calls exec(): what a hostile "checkpoint" would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def not_a_checkpoint(kind: str, source: Path, path: Path, marker: Path) -> Path:
    if kind == "random_bytes":
        path.write_bytes(os.urandom(50_000))
    elif kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle_with_code":
        torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, path)  # torch's own zip format
    elif kind == "plain_pickle_with_code":
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    elif kind == "hyperparameters_with_code":
        # A plain string passes weights_only; building the network would instantiate it (Hydra's _target_).
        code = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}
        tampered(source, path, lambda c: c["hyper_parameters"]["arch"].update(hidden=code))
    return path


KINDS = ["random_bytes", "truncated", "pickle_with_code", "plain_pickle_with_code", "hyperparameters_with_code"]
EXPECTED = {
    "random_bytes": "not a PyTorch checkpoint, or a truncated or corrupted one",
    "truncated": "not a PyTorch checkpoint, or a truncated or corrupted one",
    "pickle_with_code": "refused: loading it would call exec",
    "plain_pickle_with_code": "not a PyTorch checkpoint, or a truncated or corrupted one",
    "hyperparameters_with_code": "refused: arch.hidden._target_ is 'builtins.open'",
}


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_checkpoint_is_refused_without_running_anything(trained: Path, tmp_path: Path, kind):
    marker = tmp_path / "code-ran"
    path = not_a_checkpoint(kind, trained / "models" / "latest" / "model.ckpt", tmp_path / "model.ckpt", marker)
    with pytest.raises(CheckpointError) as refusal:
        load_trained(path)
    assert str(refusal.value).startswith(f"{path}: ")
    assert EXPECTED[kind] in str(refusal.value)
    assert "weights_only=False" not in str(refusal.value)  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


def test_the_hostile_payloads_are_live(tmp_path: Path):
    """The check that the tests above can fail: loaded the unsafe way, each payload does run its code."""
    source = tmp_path / "source.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": {"hidden": [64]}}}, source)
    marker = tmp_path / "pickle-ran"
    torch.load(not_a_checkpoint("pickle_with_code", source, tmp_path / "pickle.ckpt", marker), weights_only=False)
    assert marker.read_text() == "ran"
    marker = tmp_path / "plain-pickle-ran"
    pickle.loads(not_a_checkpoint("plain_pickle_with_code", source, tmp_path / "plain.ckpt", marker).read_bytes())
    assert marker.read_text() == "ran"
    marker = tmp_path / "hyperparameters-ran"
    hostile = not_a_checkpoint("hyperparameters_with_code", source, tmp_path / "hparams.ckpt", marker)
    instantiate(torch.load(hostile, weights_only=True)["hyper_parameters"]["arch"], _convert_="all")["hidden"].close()
    assert marker.exists()


@pytest.mark.subprocess
def test_evaluate_refuses_a_pickle_with_code_plainly(trained: Path, tmp_path: Path):
    marker = tmp_path / "code-ran"
    source = trained / "models" / "latest" / "model.ckpt"
    path = not_a_checkpoint("pickle_with_code", source, tmp_path / "model.ckpt", marker)
    message = refused(trained, f"ckpt={path}")
    assert f"vaelab: {path}: {EXPECTED['pickle_with_code']}" in message and "Nothing in it was run" in message
    assert not marker.exists()


@pytest.mark.subprocess
def test_the_project_checkpoints_still_load_and_name_what_they_are(trained: Path):
    module = load_trained(trained / "models" / "latest" / "model.ckpt")
    assert module.hparams.latent_dim == 4 and module.lineage["run_id"] == run_id_of(trained)
    config = yaml.safe_load((trained / "models" / "latest" / "config.yaml").read_text())
    assert config["model"]["latent_dim"] == 4
