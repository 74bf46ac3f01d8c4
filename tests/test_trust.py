"""Nothing read back from a run's folder runs unless trusted: every `_target_` that resume would build from a stored
file (the run's config.yaml, its last checkpoint's hyper-parameters and lineage) is on vaelab's trusted list, or named
again by the user on the resume command line. A refused resume runs nothing, says why in one line (exit 2), and
leaves the run's status and tags exactly as they were.

Every payload here is live: built the way the base code built it, it writes a marker file (test_the_payloads_are_live).
The trained run is made once per module; each test tampers with its own copy of that project.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import TINY, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, mlflow_client
from vaelab.errors import CheckpointError, VaelabError
from vaelab.stages.resume import resumption
from vaelab.stages.train import train

MARKER = "payload-ran"


class WritesMarker:
    """Unpickling this writes the marker: what a hostile file that torch.load(weights_only=False) reads would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with one FINISHED training run (outputs/<run_id>/, its MLflow run)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VAELAB_ROOT", str(root))
        env.delenv("DVC_ROOT", raising=False)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        train(make_config(*TINY, "trainer.max_epochs=1", "eval.val_limit=50", "tracking.system_metrics=false"))
    return root


@pytest.fixture
def project(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the trained project, with the payloads' files beside it."""
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    monkeypatch.setenv("VAELAB_ROOT", str(root))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.save(WritesMarker(root / MARKER), root / "evil.pt")
    write_hubconf(root)
    return root


def write_hubconf(root: Path) -> None:
    """root/hub/hubconf.py, which writes the marker when torch.hub imports it."""
    hub = root / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(root / MARKER)!r}, 'w').write('ran')\ndef payload(**kwargs): pass\n")


def run_id_of(root: Path) -> str:
    [run] = all_runs(root)
    return run.info.run_id


def load_pickle(root: Path) -> dict:
    """A target that runs the pickle in evil.pt."""
    return {"_target_": "torch.load", "f": str(root / "evil.pt"), "weights_only": False}


def hub_load(root: Path) -> dict:
    """A target that imports hub/hubconf.py, whatever other arguments (a trainer's) it is given."""
    return {"_target_": "torch.hub.load", "repo_or_dir": str(root / "hub"), "model": "payload", "source": "local"}


# Each edit of the stored config, as someone with write access to outputs/<run_id>/ could make it.
CONFIG_EDITS: dict[str, Callable[[dict, Path], None]] = {
    "callback": lambda c, root: c["callbacks"].update(evil=load_pickle(root)),
    "trainer_target": lambda c, root: c["trainer"].update(hub_load(root)),
    "optimizer_os_system": lambda c, root: c["optim"].update(_target_="os.system"),
    "partial": lambda c, root: c["callbacks"].update(
        evil={"_target_": "os.system", "_partial_": True, "command": f"touch {root / MARKER}"}
    ),
    "nested_in_callback_args": lambda c, root: c["callbacks"].update(
        evil={"_target_": "lightning.pytorch.callbacks.LambdaCallback", "on_fit_start": load_pickle(root)}
    ),
    "logger_target": lambda c, root: c["logger"].update(load_pickle(root)),
    "trainer_plugin": lambda c, root: c["trainer"].update(plugins=[load_pickle(root)]),
    # The stored config cannot vouch for itself: only the command line's resume.trust counts.
    "trust_in_the_stored_config": lambda c, root: c.update(
        resume={"run": None, "trust": ["torch.load"]}, callbacks={**c["callbacks"], "evil": load_pickle(root)}
    ),
}


def edit_config(root: Path, run_id: str, edit: Callable[[dict, Path], None]) -> Path:
    path = root / "outputs" / run_id / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config, root)
    path.write_text(yaml.safe_dump(config))
    return path


def edit_checkpoint(root: Path, run_id: str, edit: Callable[[dict], None]) -> Path:
    path = root / "outputs" / run_id / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


def run_record(root: Path, run_id: str) -> tuple[str, dict[str, str]]:
    run = mlflow_client(root).get_run(run_id)
    return run.info.status, dict(run.data.tags)


def set_status(root: Path, run_id: str, status: str) -> None:
    if status != "FINISHED":
        mlflow_client(root).set_terminated(run_id, status)


def refused_resume(root: Path, run_id: str, *overrides: str) -> str:
    """train(resume=<run_id>) must refuse: the message, after checking that nothing ran and the run is untouched."""
    before = run_record(root, run_id)
    with pytest.raises(VaelabError) as refusal:
        train(make_config(f"resume={run_id}", *overrides))
    message = str(refusal.value)
    assert "\n" not in message, message
    assert not (root / MARKER).exists(), "the payload ran"
    assert run_record(root, run_id) == before
    return message


@pytest.mark.integration
@pytest.mark.parametrize("status", ["FINISHED", "KILLED"])
@pytest.mark.parametrize("variant", sorted(CONFIG_EDITS))
def test_resume_refuses_a_stored_config_naming_an_untrusted_target(project: Path, variant: str, status: str):
    run_id = run_id_of(project)
    set_status(project, run_id, status)
    config = edit_config(project, run_id, CONFIG_EDITS[variant])
    message = refused_resume(project, run_id)
    assert message.startswith(f"cannot resume run {run_id}: {config} names ")
    assert "nothing from it was run" in message
    assert f"+resume.run={run_id} '+resume.trust=[" in message


CHECKPOINT_EDITS: dict[str, Callable[[dict, Path], None]] = {
    "hyper_parameters": lambda c, root: c["hyper_parameters"]["arch"].update(hidden=load_pickle(root)),
    "hyper_parameters_optimizer": lambda c, root: c["hyper_parameters"]["optimizer"].update(_target_="os.system"),
    "lineage_config": lambda c, root: c["vaelab"]["config"]["callbacks"].update(evil=load_pickle(root)),
}


@pytest.mark.integration
@pytest.mark.parametrize("variant", sorted(CHECKPOINT_EDITS))
def test_resume_refuses_a_checkpoint_naming_an_untrusted_target(project: Path, variant: str):
    run_id = run_id_of(project)
    checkpoint = edit_checkpoint(project, run_id, lambda c: CHECKPOINT_EDITS[variant](c, project))
    message = refused_resume(project, run_id)
    assert message.startswith(f"cannot resume run {run_id}: {checkpoint} names ")


@pytest.mark.integration
def test_resume_refuses_a_last_checkpoint_holding_a_pickle_with_code(project: Path):
    run_id = run_id_of(project)
    checkpoint = project / "outputs" / run_id / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": WritesMarker(project / MARKER)}, checkpoint)
    assert "refused: loading it would call exec" in refused_resume(project, run_id)


@pytest.mark.integration
def test_a_target_the_user_names_again_on_the_command_line_is_trusted(project: Path):
    run_id = run_id_of(project)
    mine = {"_target_": "helpers.faults_callbacks.InjectFaults", "run_name": "mine"}
    edit_config(project, run_id, lambda c, root: c["callbacks"].update(mine=mine))
    message = refused_resume(project, run_id)
    assert "callbacks.mine._target_='helpers.faults_callbacks.InjectFaults'" in message
    trusted = ["+resume.trust=[helpers.faults_callbacks.InjectFaults]"]
    resumed = resumption(make_config(f"+resume.run={run_id}", *trusted), [f"+resume.run={run_id}", *trusted])
    assert resumed.run_id == run_id and resumed.cfg.callbacks.mine._target_ == mine["_target_"]
    # Trust names exactly what it trusts: another untrusted target is still refused.
    edit_config(project, run_id, lambda c, root: c["callbacks"].update(evil=load_pickle(root)))
    with pytest.raises(VaelabError, match=r"callbacks\.evil\._target_='torch\.load'"):
        resumption(make_config(f"+resume.run={run_id}", *trusted), [f"+resume.run={run_id}", *trusted])
    assert not (project / MARKER).exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("status", ["FINISHED", "KILLED"])
def test_a_refused_resume_exits_2_with_one_line_and_leaves_the_run_as_it_was(project: Path, status: str):
    run_id = run_id_of(project)
    set_status(project, run_id, status)
    edit_config(project, run_id, CONFIG_EDITS["nested_in_callback_args"])
    before = run_record(project, run_id)
    done = run_entry("train.py", f"resume={run_id}", root=project, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"vaelab: cannot resume run {run_id}: ") and "on_fit_start._target_='torch.load'" in line
    assert not (project / MARKER).exists()
    assert run_record(project, run_id) == before


@pytest.mark.integration
def test_a_failed_resume_of_a_finished_run_leaves_it_finished(project: Path):
    """Not a refusal: the config is trusted, but the trainer cannot be built from it."""
    run_id = run_id_of(project)
    edit_config(project, run_id, lambda c, root: c["trainer"].update(no_such_argument=1))
    before = run_record(project, run_id)
    with pytest.raises(Exception, match="no_such_argument"):
        train(make_config(f"resume={run_id}"))
    assert run_record(project, run_id) == before


# -- The exported MLflow model -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_pyfunc_model_whose_checkpoint_names_an_untrusted_target_is_refused(project: Path):
    """Regression test: the pyfunc loader reads its checkpoint through vaelab.checkpoints.load_trained."""
    import mlflow.pyfunc

    folder = project / "outputs" / run_id_of(project) / "model"
    [checkpoint] = (folder / "data").rglob("*.ckpt")
    tampered = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tampered["hyper_parameters"]["arch"]["hidden"] = load_pickle(project)
    torch.save(tampered, checkpoint)
    with pytest.raises(CheckpointError, match="refused: arch.hidden._target_ is 'torch.load'"):
        mlflow.pyfunc.load_model(str(folder))
    assert not (project / MARKER).exists()


# -- The trusted list itself (quick) ------------------------------------------------------------------------------


def test_every_target_anywhere_in_a_config_is_checked_and_only_the_named_ones_are_trusted():
    from vaelab.training.builder import untrusted_targets

    config = {
        "trainer": {"_target_": "lightning.pytorch.Trainer", "plugins": [{"_target_": "torch.load"}]},
        "optim": {"_target_": "torch.optim.Adam", "_partial_": True},
        "callbacks": {
            "bar": {"_target_": "vaelab.training.callbacks.ThrottledRichProgressBar"},
            "stop": {"_target_": "lightning.pytorch.callbacks.EarlyStopping", "monitor": "val/elbo"},
            "lambda": {
                "_target_": "lightning.pytorch.callbacks.LambdaCallback",
                "on_fit_start": {"_target_": "os.system"},
            },
            "mine": {"_target_": "mypkg.MyCallback"},
        },
        "logger": {"_target_": "vaelab.stages.logger.RunLogger"},
        "objective": {"_target_": "vaelab.model.objectives.ELBO"},
    }
    assert untrusted_targets(config) == [
        ("trainer.plugins[0]", "torch.load"),
        ("callbacks.lambda.on_fit_start", "os.system"),
        ("callbacks.mine", "mypkg.MyCallback"),
    ]
    trusted = ["mypkg.MyCallback", "os.system"]
    assert untrusted_targets(config, trusted=trusted) == [("trainer.plugins[0]", "torch.load")]


def test_a_target_outside_vaelab_torch_optim_and_lightning_pytorch_is_refused_without_importing_it():
    import sys

    from vaelab.training.builder import untrusted_targets

    assert "torch.utils.bottleneck" not in sys.modules
    assert untrusted_targets({"_target_": "torch.utils.bottleneck.main"}) == [("", "torch.utils.bottleneck.main")]
    assert "torch.utils.bottleneck" not in sys.modules


def test_the_payloads_are_live(tmp_path: Path):
    """The check that the refusals above can fail: built as the base code built them, the payloads run."""
    torch.save(WritesMarker(tmp_path / MARKER), tmp_path / "evil.pt")
    instantiate(OmegaConf.create(load_pickle(tmp_path)))
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    write_hubconf(tmp_path)
    instantiate(OmegaConf.create(hub_load(tmp_path)), max_epochs=1, logger=False)
    assert (tmp_path / MARKER).exists()
