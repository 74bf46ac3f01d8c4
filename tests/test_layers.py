"""The package's layers are walls a tool checks: import-linter's contracts in pyproject.toml hold for the tree, and
planting a forbidden import in a layer breaks the build. And every process imports only what its work needs: Lightning
alone costs a process several seconds of imports, which every DVC stage, sweep job and model load would pay again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import REPO, TINY
from helpers.processes import run_entry, subprocess_env

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
    assert "5 kept, 0 broken" in done.stdout


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
        ("stages/budget.py", "import lightning.pytorch", "Reading, evaluating and serving a checkpoint"),
        ("training/builder.py", "import lightning.pytorch", "Reading, evaluating and serving a checkpoint"),
        ("stages/export.py", "import vaelab.training.callbacks", "Reading, evaluating and serving a checkpoint"),
    ],
)
def test_a_planted_import_breaks_its_contract(tree: Path, module: str, planted: str, contract: str):
    path = tree / "src" / "vaelab" / module
    path.write_text(path.read_text() + f"\n{planted}  # planted\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert f"{contract}" in done.stdout and "BROKEN" in done.stdout


def packages_listed(importtime: str) -> set[str]:
    """The top-level packages in a `python -X importtime` listing (a process's stderr)."""
    lines = [line.split("|")[-1] for line in importtime.splitlines() if line.startswith("import time:")]
    return {name.strip().split(".")[0] for name in lines}


def python_in(root: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """A fresh Python process run with `arguments` in the project `root`, its output captured."""
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root)),
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def imported_packages(script: str, *overrides: str, root: Path) -> set[str]:
    """The top-level packages a real run of pipelines/<script> imports, as `python -X importtime` lists them."""
    return packages_listed(python_in(root, "-X", "importtime", str(REPO / "pipelines" / script), *overrides).stderr)


HEAVY = ("lightning", "mlflow", "matplotlib", "torchvision", "optuna")  # seconds of imports each, Lightning most


def heavy_imports(code: str, root: Path) -> set[str]:
    """Which of HEAVY a fresh Python process holds in sys.modules once it has run `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(name for name in {HEAVY!r} if name in sys.modules))"
    done = python_in(root, "-c", probe)
    return set(done.stdout.splitlines()[-1].split()) if done.stdout.strip() else set()


def test_preparing_data_imports_neither_lightning_nor_mlflow(project: Path):
    # Every DVC prepare stage pays for what it imports; the training stack is seconds of it.
    packages = imported_packages("prepare.py", "data=digits", root=project)
    assert "torch" in packages  # the listing is real: preparing saves tensors
    assert not packages & {"lightning", "mlflow", "matplotlib", "optuna", "hydra_plugins"}


# A search: a multirun on the Optuna sweeper, with a one-parameter space.
SEARCH = ["-m", "hydra/sweeper=optuna", "objective.beta=interval(0.5,2)"]


@pytest.mark.parametrize(
    ("script", "arguments", "bad"),
    [
        ("train.py", [], "trainer.max_epochs=-1"),
        ("evaluate.py", [], "eval.iw_k=-1"),
        pytest.param("train.py", SEARCH, "hydra.sweeper.n_trials=-1", id="search"),
    ],
)
def test_a_bad_value_is_refused_before_torch_is_imported(project: Path, script: str, arguments: list[str], bad: str):
    # A typo on the command line is reported in about a second, not after the seconds the training stack takes.
    done = python_in(project, "-X", "importtime", str(REPO / "pipelines" / script), *arguments, bad, check=False)
    assert done.returncode == 2 and f"{bad}: allowed" in done.stderr, done.stderr[-2000:]
    packages = packages_listed(done.stderr)
    assert "hydra" in packages  # the listing is real: the config was composed
    assert not packages & {"torch", "lightning", "mlflow", "matplotlib", "optuna"}


def test_the_evaluate_stage_imports_no_lightning_matplotlib_or_mlflow_until_it_evaluates(project: Path):
    assert heavy_imports("import vaelab.stages.evaluate", project) == set()


def test_loading_the_sweep_callback_and_summary_imports_neither_torch_nor_lightning(project: Path):
    # Hydra's parent process of a parallel sweep loads these, and trains nothing itself.
    code = "import vaelab.sweep.callback, vaelab.sweep.summary, sys; assert 'torch' not in sys.modules"
    assert heavy_imports(code, project) == set()


def test_drawing_a_figure_imports_no_torchvision_and_a_chart_no_torch(project: Path):
    # torchvision imports torch's compiler: seconds for an evaluation that draws its figures. A sweep's or a search's
    # parent process draws its summary charts with matplotlib alone.
    assert heavy_imports("import vaelab.figures", project) == {"matplotlib"}
    assert heavy_imports("import vaelab.charts, sys; assert 'torch' not in sys.modules", project) == {"matplotlib"}


def test_loading_the_search_driver_imports_neither_torch_nor_lightning(project: Path):
    # Validating a search's command line and space needs Hydra only; Optuna and the training stack come after.
    code = "import vaelab.search.driver, sys; assert 'torch' not in sys.modules"
    assert heavy_imports(code, project) == set()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root holding one tiny trained model: models/latest/, its MLflow run and its exported MLflow model."""
    root = tmp_path_factory.mktemp("trained")
    run_entry("train.py", *TINY, "trainer.max_epochs=1", "eval.val_limit=50", "publish=true", root=root)
    return root


def test_evaluating_a_checkpoint_imports_no_lightning(trained: Path):
    # Building the VAE from the checkpoint's hyper-parameters and loading its weights takes torch and the model
    # layer; the figures and the run it logs into take matplotlib and MLflow.
    packages = imported_packages("evaluate.py", "eval.iw_k=4", root=trained)
    assert list((trained / "outputs").glob("*/eval.json"))
    assert {"torch", "matplotlib", "mlflow"} <= packages
    assert not packages & {"lightning", "torchmetrics", "optuna"}


def test_loading_the_exported_model_imports_no_lightning(trained: Path):
    [model] = (trained / "outputs").glob("*/model")
    code = (
        "import mlflow.pyfunc, numpy as np\n"
        f"model = mlflow.pyfunc.load_model({str(model)!r})\n"
        "assert model.predict(np.full((2, 1, 8, 8), 0.5, dtype=np.float32)).shape == (2, 4)"
    )
    assert heavy_imports(code, trained) == {"mlflow"}


def test_the_checkpoint_reader_knows_the_training_modules_constructor_arguments():
    from inspect import Parameter, signature

    from vaelab.checkpoints import OPTIONAL_HPARAMS, REQUIRED_HPARAMS
    from vaelab.training.module import VAEModule

    arguments = [p for name, p in signature(VAEModule.__init__).parameters.items() if name != "self"]
    assert tuple(p.name for p in arguments if p.default is Parameter.empty) == REQUIRED_HPARAMS
    assert tuple(p.name for p in arguments if p.default is not Parameter.empty) == OPTIONAL_HPARAMS


def test_a_checkpoint_read_without_lightning_gives_back_the_lightning_module_that_trained_it(trained: Path):
    import torch

    from vaelab.checkpoints import load_trained
    from vaelab.training.module import VAEModule

    model = load_trained(trained / "models" / "latest" / "model.ckpt")
    module = model.lightning_module()
    assert isinstance(module, VAEModule) and not module.training
    assert module.lineage == model.lineage and module.hparams == model.hparams
    weights = model.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in module.state_dict().items())
