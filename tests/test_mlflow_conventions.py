"""What the MLflow UI shows of vaelab's runs: names that tell runs apart, MLflow's standard source tags, and the
prepared dataset as the run's input, a registry alias on the model a run registers, and the experiment's kind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.config import REPO, TINY, make_config
from helpers.stores import mlflow_client
from vaelab.config import problems
from vaelab.stages.train import train
from vaelab.sweep.jobs import name_after_overrides, swept_keys
from vaelab.tracking.run import Run

READABLE_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,3}")
MODEL = "conventions-vae"
CONTEXT = "mlflow.data.context"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """One tiny training that registers its model under an alias, in a project of its own, shared by the tests
    that read what it left: (project, run id, what it printed)."""
    root = tmp_path_factory.mktemp("trained") / "project"
    root.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAELAB_ROOT", str(root))
        patch.delenv("DVC_ROOT", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            summary = train(make_config(*TINY, f"tracking.register_as={MODEL}", "tracking.alias=champion"))
        yield root, str(summary["run_id"]), printed.getvalue()


def run_name(project: Path, run: Run) -> str:
    return mlflow_client(project).get_run(run.run_id).info.run_name


@pytest.mark.integration
def test_runs_of_one_seed_get_different_readable_names(project: Path):
    names = []
    for _ in range(3):
        random.seed(0)  # as training seeds Python's random before its run exists
        names.append(run_name(project, Run.create(make_config(*TINY), "train", overrides=[], tags={})))
    assert len(set(names)) == 3, names
    assert all(READABLE_NAME.fullmatch(name) for name in names), names


@pytest.mark.integration
def test_naming_a_run_leaves_the_seeded_random_stream_as_it_was(project: Path):
    random.seed(0)
    Run.create(make_config(*TINY), "train", overrides=[], tags={})
    assert random.random() == random.Random(0).random()


@pytest.mark.integration
def test_tracking_run_name_names_the_run(project: Path):
    run = Run.create(make_config(*TINY, "tracking.run_name=baseline"), "train", overrides=[], tags={})
    assert run_name(project, run) == "baseline"


def test_a_sweep_job_is_named_by_its_overrides_without_their_secrets():
    cfg = make_config(*TINY)
    name_after_overrides(cfg, 3, ["objective.beta=4", "model.latent_dim=8", "+db.password=hunter2"])
    assert cfg.tracking.run_name == "objective.beta=4,model.latent_dim=8,+db.password=***"


def test_a_sweep_job_is_named_by_the_values_its_sweep_varies(tmp_path: Path):
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "overrides": {"task": ["data=digits", "objective.beta=1,4", "seed=range(2)"]},
                    "sweeper": {"params": {"model.latent_dim": "2,8"}},
                }
            }
        )
    )
    cfg = make_config(*TINY)
    job = ["data=digits", "objective.beta=4", "seed=1", "model.latent_dim=8"]
    name_after_overrides(cfg, 3, job, swept_keys(tmp_path))
    assert cfg.tracking.run_name == "objective.beta=4,seed=1,model.latent_dim=8"


def test_a_sweep_job_without_overrides_is_named_by_its_number():
    cfg = make_config(*TINY)
    name_after_overrides(cfg, 3, [])
    assert cfg.tracking.run_name == "job 3"


def test_tracking_run_name_names_a_sweep_job_too():
    cfg = make_config(*TINY, "tracking.run_name=mine")
    name_after_overrides(cfg, 3, ["objective.beta=4"])
    assert cfg.tracking.run_name == "mine"


@pytest.mark.integration
def test_a_run_records_its_entry_point_and_commit_in_mlflows_source_tags(project: Path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "pipelines" / "train.py"), "data=digits"])
    run = Run.create(make_config(*TINY), "train", overrides=["data=digits"], tags={})
    tags = mlflow_client(project).get_run(run.run_id).data.tags
    assert tags["mlflow.source.name"] == "pipelines/train.py"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["vaelab.git_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])


@pytest.mark.integration
def test_a_training_run_takes_the_prepared_dataset_as_its_input(trained: tuple[Path, str, str]):
    project, run_id, _ = trained
    run = mlflow_client(project).get_run(run_id)
    [used] = run.inputs.dataset_inputs
    data_hash = run.data.tags["vaelab.data_hash"]
    assert used.dataset.name == "digits"
    assert used.dataset.digest == data_hash[:32]
    assert json.loads(used.dataset.source)["uri"] == (project / "data" / "processed" / "digits").as_uri()
    assert json.loads(used.dataset.profile)["images"] == {"train": 1297, "val": 200, "test": 300}
    tags = {tag.key: tag.value for tag in used.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["vaelab.data_hash"] == data_hash
    assert tags["vaelab.data_source"]


@pytest.mark.integration
def test_an_evaluated_run_also_takes_the_test_split_it_was_evaluated_on_as_an_input(project: Path):
    import mlflow

    where = (mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    summary = train(make_config(*TINY, "trainer.max_epochs=1", "eval.after_train=true", "eval.limit=50"))
    # Lightning's logger pointed MLflow's process-wide URI at this project's store; a caller's is back as it was
    assert (mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == where

    run = mlflow_client(project).get_run(str(summary["run_id"]))
    used = {tag.value: entry for entry in run.inputs.dataset_inputs for tag in entry.tags if tag.key == CONTEXT}
    assert set(used) == {"training", "evaluation"}
    training, evaluation = used["training"].dataset, used["evaluation"].dataset
    assert (training.name, evaluation.name) == ("digits", "digits/test")
    manifest = json.loads((project / "data" / "processed" / "digits" / "manifest.json").read_text())
    assert evaluation.digest == manifest["splits"]["test"]["sha256"][:32] != training.digest
    assert json.loads(evaluation.profile)["images"] == {"test": 300}
    assert json.loads(evaluation.profile)["images_used"] == 50
    tags = {tag.key: tag.value for tag in used["evaluation"].tags}
    assert tags["vaelab.data_hash"] == run.data.tags["vaelab.data_hash"]


@pytest.mark.integration
def test_the_registered_model_loads_by_its_alias(trained: tuple[Path, str, str], monkeypatch):
    import mlflow

    project, run_id, printed = trained
    version = mlflow_client(project).get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == run_id
    assert f"registered model {MODEL} version {version.version} as @champion" in printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.predict(np.full((2, 1, 8, 8), 0.5, dtype=np.float32)).shape == (2, 4)


def test_the_trained_model_is_the_runs_logged_model_and_loads_by_its_id(trained: tuple[Path, str, str], monkeypatch):
    import mlflow

    project, run_id, _ = trained
    client = mlflow_client(project)
    run = client.get_run(run_id)
    [output] = run.outputs.model_outputs  # what the runs table's Models column lists
    [model] = client.search_logged_models([run.info.experiment_id])
    assert model.model_id == output.model_id == run.data.tags["vaelab.model_id"]
    assert model.source_run_id == run_id and model.status.to_int() == model.status.READY.to_int()
    # The run's own copy is still read as the run's files, from the run's store (not through the logged model).
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(run_id, "model")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert loaded.predict(np.full((2, 1, 8, 8), 0.5, dtype=np.float32)).shape == (2, 4)
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model") is not None  # the run's own copy, as before


def test_an_alias_without_a_model_to_register_is_refused_in_one_line():
    [(key, value, allowed)] = problems(make_config("tracking.alias=champion"))
    assert (key, value) == ("tracking.alias", "champion") and "tracking.register_as" in allowed


@pytest.mark.parametrize("alias", ["latest", "v3", "two words", ""])
def test_an_alias_the_registry_refuses_is_refused_before_training(alias: str):
    [(key, _, _)] = problems(make_config(f"tracking.register_as={MODEL}", f"tracking.alias='{alias}'"))
    assert key == "tracking.alias"


@pytest.mark.integration
def test_the_experiment_vaelab_creates_is_a_model_training_one(project: Path):
    Run.create(make_config(*TINY, "tracking.experiment=kinds"), "train", overrides=[], tags={})
    experiment = mlflow_client(project).get_experiment_by_name("kinds")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_checkout_is_dirty_for_its_code_not_for_what_dvc_writes_or_removes(tmp_path: Path):
    import subprocess

    from vaelab.tracking.run import code_changes

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    for name in ("src/code.py", "metrics/train.json", "plots/train/curve.csv", "dvc.lock", "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "clean")
    assert code_changes(tmp_path) == ""

    (tmp_path / "metrics" / "train.json").unlink()  # DVC removes a stage's outputs before it runs
    (tmp_path / "plots" / "train" / "curve.csv").unlink()
    (tmp_path / "dvc.lock").write_text("y\n")  # ... and rewrites its lock, and `-S` the params
    (tmp_path / "params.yaml").write_text("y\n")
    assert code_changes(tmp_path) == ""

    (tmp_path / "src" / "code.py").write_text("changed\n")
    assert "src/code.py" in code_changes(tmp_path)


def test_a_run_that_a_dvc_experiment_started_names_the_experiment_and_its_baseline(monkeypatch: pytest.MonkeyPatch):
    from vaelab.tracking.run import dvc_experiment_tags

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert dvc_experiment_tags() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "later-yews")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    assert dvc_experiment_tags() == {"vaelab.dvc_experiment": "later-yews", "vaelab.dvc_baseline_rev": "0123abc"}


@pytest.mark.integration
def test_make_ui_links_each_experiment_with_runs_to_its_runs_table_in_the_model_training_view(project: Path):
    """MLflow 3's UI opens an experiment in its GenAI view unless the address asks for Model training (the browser
    test opens such a link); `make ui` prints one per experiment, and looking at a store creates nothing."""
    from vaelab.tracking.store import ensure_experiment, resolve_uri
    from vaelab.tracking.ui import describe, experiment_links

    uri, address = resolve_uri(None), "http://127.0.0.1:5000"
    assert experiment_links(uri, address) == [] and not (project / "mlflow.db").exists()
    assert f"{address}/#/experiments?workflowType=machine_learning" in describe([], address)

    client = mlflow_client(project)
    used, empty, trashed = (ensure_experiment(uri, name) for name in ("used", "empty", "trashed"))
    for experiment in (used, used, trashed):
        client.create_run(experiment)
    client.delete_experiment(trashed)

    [link] = experiment_links(uri, address)
    assert (link.name, link.runs) == ("used", "2")
    assert link.url == f"{address}/#/experiments/{used}/runs?workflowType=machine_learning"
    assert link.url in describe([link], address)


@pytest.mark.parametrize("set_in", ["code", "environment", "nowhere"])
def test_mlflows_process_wide_tracking_uri_is_put_back_however_the_caller_had_set_it(
    set_in: str, tmp_path: Path, monkeypatch
):
    import mlflow

    from vaelab.tracking.store import process_tracking_uri

    caller, store = f"sqlite:///{tmp_path / 'caller.db'}", f"sqlite:///{tmp_path / 'run.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    try:
        if set_in == "code":  # mlflow.set_tracking_uri also writes the variable: remove it, as a test's fixture may
            mlflow.set_tracking_uri(caller)
            os.environ.pop("MLFLOW_TRACKING_URI")
        elif set_in == "environment":
            monkeypatch.setenv("MLFLOW_TRACKING_URI", caller)
        where = (mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
        with process_tracking_uri():
            mlflow.set_tracking_uri(store)  # what Lightning's MLflow logger does
        assert (mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == where
    finally:
        mlflow.set_tracking_uri(None)
