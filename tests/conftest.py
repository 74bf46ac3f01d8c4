"""Shared fixtures. Every test gets its own project root (VAELAB_ROOT) and MLflow store under tmp_path; the helpers
the tests import live in tests/helpers/."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.config import DEBIAN_FASHION
from helpers.processes import run_entry, running_mlflow_server


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project root: data, outputs, models, metrics and mlflow.db all land here. MLflow's process-wide
    tracking URI starts and ends unset, so no test's store is where another test's MLflow calls go."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("VAELAB_ROOT", str(root))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    unset_mlflow_tracking_uri()
    yield root
    unset_mlflow_tracking_uri()


def unset_mlflow_tracking_uri() -> None:
    mlflow = sys.modules.get("mlflow")  # not imported yet: nothing is set, and the quick tier need not import it
    if mlflow is not None:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def fashion_processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST prepared once per session (about 5 s), shared read-only by tests that need it."""
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("fashion")
    run_entry("prepare.py", "data=fashion_mnist", root=root)
    return root / "data" / "processed" / "fashion_mnist"


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` with its own sqlite backend and artifact folder: yields (its URI, that store folder)."""
    store = tmp_path / "server"
    store.mkdir()
    with running_mlflow_server(f"sqlite:///{store / 'mlflow.db'}", store / "artifacts", tmp_path / "server.log") as uri:
        yield uri, store
