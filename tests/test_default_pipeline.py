"""Slow: the default pipeline itself (Fashion-MNIST, 30 epochs, k = 1000 on the 10k test images), via dvc repro."""

import json
from pathlib import Path

import pytest

from helpers.config import needs_fashion_mnist
from helpers.processes import copy_repo, sh
from helpers.stores import all_runs

pytestmark = pytest.mark.subprocess


@pytest.mark.slow
@needs_fashion_mnist
def test_the_default_dvc_repro_reaches_sensible_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root, env = copy_repo(tmp_path, monkeypatch, [])
    sh("dvc", "repro", cwd=root, env=env)
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert evaluation["eval/iw_k"] == 1000 and evaluation["eval/n_images"] == 10_000
    # A 784-512-16 Bernoulli VAE on dynamically binarized Fashion-MNIST lands near 235-245 nats.
    assert 220 < evaluation["test/nll_iw"] < 250
    assert 0 < evaluation["test/inference_gap"] < 10
    assert evaluation["test/nll_iw"] < -evaluation["test/elbo"]
    [run] = all_runs(root)
    assert run.info.status == "FINISHED" and run.data.metrics["test/nll_iw"] == pytest.approx(evaluation["test/nll_iw"])
