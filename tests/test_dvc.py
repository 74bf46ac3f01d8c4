"""DVC: `dvc repro` runs prepare -> train -> evaluate in a copy of the repo, then trains nothing again;
a changed parameter reruns only what depends on it; changed raw data reruns all three stages;
`dvc exp run -S` really reaches the training code."""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from helpers.config import REPO, TINY
from helpers.mnist import idx_bytes, mnist_arrays, write_mnist
from helpers.processes import copy_repo, sh
from helpers.stores import all_runs
from vaelab.checkpoints import load_trained
from vaelab.params import compose_params

TINY_EVAL = [*TINY, "trainer.max_epochs=1", "eval.val_limit=100"]


@pytest.fixture
def repo_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    return copy_repo(tmp_path, monkeypatch, TINY_EVAL)


def changed_stages(root: Path, env: dict) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=root, env=env).strip().splitlines()[-1] or "{}"))


def prepared_data_hash(root: Path) -> str:
    """DVC's hash of the prepare stage's output, as dvc.lock records it."""
    [out] = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    return out["md5"]


@pytest.mark.subprocess
def test_dvc_repro_runs_the_three_stages_then_only_rechecks_the_raw_data(repo_copy):
    root, env = repo_copy
    out = sh("dvc", "repro", cwd=root, env=env)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert (root / "data" / "processed" / "digits" / "manifest.json").is_file()
    assert (root / "models" / "latest" / "model.ckpt").is_file()
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert evaluation["eval/iw_k"] == 20

    [run] = all_runs(root)
    assert run.info.status == "FINISHED" and "test/nll_iw" in run.data.metrics
    assert run.info.run_id == (root / "models" / "latest" / "run_id").read_text().strip()
    assert not list(root.glob("outputs/20*")), "Hydra must not create timestamp folders"

    # `dvc plots show` draws each plot once, with its template: the per-dimension KL as bars.
    printed = sh("dvc", "plots", "show", "--json", cwd=root, env=env)
    shown = json.JSONDecoder().raw_decode(printed[printed.index("{") :])[0]["data"]
    figures = ("reconstructions", "samples", "traversals", "interpolations", "latent_scatter")
    assert sorted(shown) == sorted(
        ["elbo_per_epoch", "plots/eval/kl_per_dim.csv", *(f"plots/eval/{f}.png" for f in figures)]
    )
    assert all(len(drawn) == 1 for drawn in shown.values())
    assert shown["plots/eval/kl_per_dim.csv"][0]["content"]["mark"]["type"] == "bar"

    again = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage 'train'" not in again and "Running stage 'evaluate'" not in again
    assert "Stage 'train' didn't change, skipping" in again  # prepare rewrote the very same bytes
    assert changed_stages(root, env) == {"prepare"}  # always: it checks the raw data, which DVC cannot see

    prepared = prepared_data_hash(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["latent_dim"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = sh("dvc", "repro", cwd=root, env=env)
    assert prepared_data_hash(root) == prepared
    assert "Running stage 'train'" in rerun and "Running stage 'evaluate'" in rerun
    assert load_trained(root / "models" / "latest" / "model.ckpt").hparams.latent_dim == 6


@pytest.mark.subprocess
def test_dvc_exp_run_set_param_reaches_the_training_code(repo_copy):
    root, env = repo_copy
    overrides = [arg for o in TINY_EVAL if not o.startswith("model.latent_dim") for arg in ("-S", o)]
    sh("dvc", "exp", "run", *overrides, "-S", "model.latent_dim=8", cwd=root, env=env)
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["latent_dim"] == 8
    module = load_trained(root / "models" / "latest" / "model.ckpt")
    assert module.hparams.latent_dim == 8
    assert module.vae.encoder.net[-1].out_features == 2 * 8
    [run] = all_runs(root)
    assert run.data.params["model.latent_dim"] == "8"
    assert "8" in sh("dvc", "exp", "show", "--csv", cwd=root, env=env)
    # The run leads back to its `dvc exp show` row: the experiment's name and the commit it is based on.
    assert run.data.tags["vaelab.dvc_baseline_rev"] == sh("git", "rev-parse", "HEAD", cwd=root).strip()
    assert run.data.tags["vaelab.dvc_experiment"] in sh("dvc", "exp", "list", "--name-only", cwd=root, env=env)


@pytest.mark.slow
@pytest.mark.subprocess
def test_queued_dvc_experiments_run_two_at_a_time_each_with_its_values_into_the_repositorys_store(repo_copy):
    root, env = repo_copy
    fixed = [arg for o in TINY_EVAL if not o.startswith("model.latent_dim") for arg in ("-S", o)]
    for latent_dim in (3, 5):
        sh("dvc", "exp", "run", "--queue", *fixed, "-S", f"model.latent_dim={latent_dim}", cwd=root, env=env)
    sh("dvc", "queue", "start", "-j", "2", cwd=root, env=env)
    try:
        deadline = time.monotonic() + 900
        while re.search(r"\b(Queued|Running)\b", status := sh("dvc", "queue", "status", cwd=root, env=env)):
            assert time.monotonic() < deadline, status
            time.sleep(5)
    finally:
        sh("dvc", "queue", "stop", cwd=root, env=env)
    assert status.count("Success") == 2, status

    # Each ran in a temporary copy that DVC has deleted since; their runs are in the repository's own store.
    runs = all_runs(root)
    assert sorted(run.data.params["model.latent_dim"] for run in runs) == ["3", "5"]
    assert all(run.info.status == "FINISHED" and "test/nll_iw" in run.data.metrics for run in runs)
    names = sh("dvc", "exp", "list", "--name-only", cwd=root, env=env).split()
    assert sorted(run.data.tags["vaelab.dvc_experiment"] for run in runs) == sorted(names)


def test_the_committed_params_yaml_is_conf_composed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAELAB_ROOT", str(REPO))
    fresh = compose_params([], tmp_path / "params.yaml")
    assert fresh.read_text() == (REPO / "params.yaml").read_text(), "run `make params` after editing conf/"


@pytest.mark.slow
@pytest.mark.subprocess
def test_dvc_repro_after_the_raw_data_changed_reruns_every_stage_and_logs_the_new_data_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The raw files live outside the repository (data.root), where DVC cannot hash them: prepare must still notice."""
    arrays = mnist_arrays(n_train=120, n_test=40)
    raw = write_mnist(tmp_path / "mnist", {name: idx_bytes(array) for name, array in arrays.items()})
    tiny_mnist = [o for o in TINY_EVAL if not o.startswith("data=")]
    root, env = copy_repo(tmp_path, monkeypatch, [*tiny_mnist, "data=mnist", f"data.root={raw}", "data.val_size=20"])
    sh("dvc", "repro", cwd=root, env=env)
    manifest = root / "data" / "processed" / "mnist" / "manifest.json"
    first_hash = json.loads(manifest.read_text())["data_hash"]

    inverted = 255 - arrays["train-images-idx3-ubyte"]  # same shape and header, other pixels
    write_mnist(raw, {"train-images-idx3-ubyte": idx_bytes(inverted)})
    rerun = sh("dvc", "repro", cwd=root, env=env)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in rerun
    second_hash = json.loads(manifest.read_text())["data_hash"]
    assert second_hash != first_hash

    newest, oldest = all_runs(root)
    assert {oldest.data.tags["vaelab.data_hash"], newest.data.tags["vaelab.data_hash"]} == {first_hash, second_hash}
    assert newest.data.tags["vaelab.data_hash"] == second_hash
    assert "test/nll_iw" in newest.data.metrics  # evaluate logged into the run trained on the new data
    assert json.loads((root / "metrics" / "eval.json").read_text())["run_id"] == newest.info.run_id
