"""Shared fixtures. Every test gets its own project root (VAELAB_ROOT) and MLflow store under tmp_path."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# Small but real: scikit-learn's digits, one or two epochs, few importance samples.
TINY = [
    "data=digits",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "eval.iw_k=20",
    "eval.val_iw_k=4",
    "arch.hidden=[64]",
    "model.latent_dim=4",
]

# One tiny search trial or sweep job: one epoch of TINY's model. (TINY's latent_dim stays the config's, so a search
# may sample it.)
TINY_TRIAL = [o for o in TINY if not o.startswith(("trainer.max_epochs=", "model.latent_dim="))] + [
    "trainer.max_epochs=1"
]

# A run long enough to signal mid-way: small batches make each digits epoch take ~1 s, so a signal sent after the
# first checkpoint lands between two.
SIGNAL_EPOCHS = 8
SIGNALLABLE = [*TINY, f"trainer.max_epochs={SIGNAL_EPOCHS}", "data.batch_size=16"]

needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup installs it as root)",
)


def make_config(*overrides: str):
    """Compose conf/train.yaml the way the entry points do."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project root: data, outputs, models, metrics and mlflow.db all land here."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("VAELAB_ROOT", str(root))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="session")
def fashion_processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST prepared once per session (about 5 s), shared read-only by tests that need it."""
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("fashion")
    run_entry("prepare.py", "data=fashion_mnist", root=root)
    return root / "data" / "processed" / "fashion_mnist"


def copy_processed(project: Path, processed: Path) -> None:
    target = project / "data" / "processed" / processed.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(processed, target)


# MNIST as users have it: a tiny but well-formed set of the four IDX files, for data.root.


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: big-endian magic number (0x08 = unsigned bytes, then the number of dimensions), sizes, data."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 120, n_test: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_mnist(folder: Path, files: dict[str, bytes], gzipped=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    """The IDX files in `folder`, some gzipped (`<name>.gz`) and some plain, as users have them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name in gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def mnist_files(**sizes: int) -> dict[str, bytes]:
    """The four IDX files' bytes; `n_train` and `n_test` as in mnist_arrays."""
    return {name: idx_bytes(array) for name, array in mnist_arrays(**sizes).items()}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment minus vaelab/DVC/MLflow locations, with the venv's python first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VAELAB_ROOT", "DVC_ROOT", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_mlflow_server(backend_store_uri: str, artifacts: Path, log: Path, wait_s: float = 90) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 at a free port, serving `backend_store_uri`; yields its http:// URI.

    Artifacts of new experiments go to `artifacts` (--artifacts-destination); its output goes to `log`. No job
    runner (nothing here uses server-side jobs; it would add eight processes) and no telemetry. Stopped by PID
    (its own process group, should it not stop).
    """
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts), "--workers", "1",
            ],
            env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    pytest.fail(f"mlflow server did not come up in {wait_s:.0f} s:\n{tail}")
                time.sleep(0.5)
        yield uri
    finally:
        process.terminate()  # the mlflow CLI stops its uvicorn worker itself
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` with its own sqlite backend and artifact folder: yields (its URI, that store folder)."""
    store = tmp_path / "server"
    store.mkdir()
    with running_mlflow_server(f"sqlite:///{store / 'mlflow.db'}", store / "artifacts", tmp_path / "server.log") as uri:
        yield uri, store


def run_entry(script: str, *overrides: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a pipelines/ entry point as a user would, in a subprocess, against project `root`."""
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / script), *overrides],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def start_training(root: Path, *overrides: str, log: Path | None = None) -> subprocess.Popen:
    """pipelines/train.py in the background, its output in `log` (or discarded)."""
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    return subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *overrides],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root)),
        stdout=output,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
    )


def signal_after_first_checkpoint(process: subprocess.Popen, root: Path, sig: int, timeout: float = 300) -> Path:
    """Send `sig` once the first last.ckpt exists, wait for the process to end, and return that checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob("outputs/*/checkpoints/last.ckpt"))
        if found:
            process.send_signal(sig)
            process.wait(timeout=120)
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"training ended (exit {process.returncode}) before its first checkpoint")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint appeared")


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path):
    client = mlflow_client(root)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time DESC"])


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def sh(*args: str, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def copy_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> tuple[Path, dict]:
    """The project's files (as git sees them) in a fresh git repository, params.yaml composed with `overrides`.

    Returns the copy and the environment to run DVC in (the venv's python first on PATH).
    """
    from vaelab.params import compose_params

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    root = tmp_path / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    monkeypatch.setenv("VAELAB_ROOT", str(root))
    compose_params(overrides, root / "params.yaml")
    env = subprocess_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh("git", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "copy", cwd=root, env=env)
    return root, env
