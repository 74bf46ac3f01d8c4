"""The entry points, servers and tools run as a user runs them: in subprocesses, against a project folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.config import REPO


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


def run_entry(
    script: str, *overrides: str, root: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a pipelines/ entry point as a user would, in a subprocess, against project `root` (`env`: more variables)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / script), *overrides],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root), **(env or {})),
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


def copy_processed(project: Path, processed: Path) -> None:
    target = project / "data" / "processed" / processed.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(processed, target)
