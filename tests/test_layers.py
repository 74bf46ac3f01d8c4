"""The package's layers are walls a tool checks: import-linter's contracts in pyproject.toml hold for the tree, and
planting a forbidden import in a layer breaks the build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import REPO
from helpers.processes import subprocess_env

pytestmark = pytest.mark.subprocess

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root/src`, with `root/pyproject.toml`'s contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=subprocess_env(PYTHONPATH=str(root / "src")),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to plant imports in."""
    root = tmp_path / "tree"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_layer_contracts_hold(tree: Path):
    done = lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("model/objectives.py", "import lightning", "The model layer imports torch only"),
        ("model/networks.py", "import vaelab.training.module", "The model layer imports torch only"),  # indirectly
        ("model/vae.py", "import matplotlib.pyplot", "The model layer imports torch only"),
        ("training/module.py", "from hydra.utils import instantiate", "The training layer imports no Hydra"),
        ("training/callbacks.py", "import mlflow", "The training layer imports no Hydra"),
        ("tracking/run.py", "import lightning.pytorch.loggers", "The tracking layer imports no Lightning"),
        ("stages/train.py", "import pipelines.train", "The library never imports the entry points"),
    ],
)
def test_a_planted_import_breaks_its_contract(tree: Path, module: str, planted: str, contract: str):
    path = tree / "src" / "vaelab" / module
    path.write_text(path.read_text() + f"\n{planted}  # planted\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert f"{contract}" in done.stdout and "BROKEN" in done.stdout


def imported_packages(script: str, *overrides: str, root: Path) -> set[str]:
    """The top-level packages a real run of pipelines/<script> imports, as `python -X importtime` lists them."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "pipelines" / script), *overrides],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root)),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [line.split("|")[-1] for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {name.strip().split(".")[0] for name in lines}


def test_preparing_data_imports_neither_lightning_nor_mlflow(project: Path):
    # Every DVC prepare stage pays for what it imports; the training stack is seconds of it.
    packages = imported_packages("prepare.py", "data=digits", root=project)
    assert "torch" in packages  # the listing is real: preparing saves tensors
    assert not packages & {"lightning", "mlflow", "matplotlib", "optuna", "hydra_plugins"}
