"""DVC: `dvc repro` runs prepare -> train -> evaluate in a copy of the repo, then is a no-op;
a changed parameter reruns only what depends on it; `dvc exp run -S` really reaches the training code."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, all_runs, copy_repo, sh
from vaelab.module import load_trained
from vaelab.params import compose_params

TINY_EVAL = [*TINY, "trainer.max_epochs=1", "eval.val_limit=100"]


@pytest.fixture
def repo_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    return copy_repo(tmp_path, monkeypatch, TINY_EVAL)


def changed_stages(root: Path, env: dict) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=root, env=env).strip().splitlines()[-1] or "{}"))


def test_dvc_repro_runs_the_three_stages_then_is_a_no_op(repo_copy):
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

    again = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage" not in again
    assert changed_stages(root, env) == set()

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["latent_dim"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage 'prepare'" not in rerun
    assert "Running stage 'train'" in rerun and "Running stage 'evaluate'" in rerun
    assert load_trained(root / "models" / "latest" / "model.ckpt").hparams.latent_dim == 6


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


def test_the_committed_params_yaml_is_conf_composed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAELAB_ROOT", str(REPO))
    fresh = compose_params([], tmp_path / "params.yaml")
    assert fresh.read_text() == (REPO / "params.yaml").read_text(), "run `make params` after editing conf/"
