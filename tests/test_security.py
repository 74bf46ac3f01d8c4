"""Security defaults: the MLflow UI and the servers the docs start listen on 127.0.0.1 unless told otherwise.

MLflow's UI and server have no login: anyone who can reach the port can read and change runs. So nothing listens
beyond this machine unless the user says so on the command line (`make ui UI_HOST=0.0.0.0`).
"""

import re
import subprocess
from pathlib import Path

import pytest

from helpers.config import REPO
from helpers.processes import subprocess_env

LOOPBACK = "127.0.0.1"


def make_ui_command(*args: str, **env: str) -> str:
    """The `mlflow ui` command line `make ui` would run (make -n prints the recipes without running any)."""
    done = subprocess.run(
        ["make", "-n", "ui", *args], cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    [command] = [line for line in done.stdout.splitlines() if line.startswith("mlflow ui ")]
    return command


@pytest.mark.subprocess
def test_make_ui_listens_on_loopback_by_default():
    command = make_ui_command()
    assert f"--host {LOOPBACK} --port 5000" in command
    assert f"sqlite:///{REPO}/mlflow.db" in command  # the project's own store


@pytest.mark.subprocess
def test_only_the_command_line_opens_make_ui_to_the_network():
    assert "--host 0.0.0.0 --port 8080" in make_ui_command("UI_HOST=0.0.0.0", "UI_PORT=8080")
    # Some shells and CI images export HOST (or a stray UI_HOST): an ambient variable must not widen it.
    assert f"--host {LOOPBACK} " in make_ui_command(UI_HOST="0.0.0.0", HOST="0.0.0.0")


@pytest.mark.subprocess
def test_make_ui_warns_when_it_listens_beyond_this_machine():
    done = subprocess.run(
        ["make", "-n", "ui", "UI_HOST=0.0.0.0"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert "no authentication" in done.stdout


def project_text_files() -> list[Path]:
    # docs/scaling.md's cluster MLflow server is one the compute nodes must reach: the one documented exception.
    docs = [page for page in sorted((REPO / "docs").glob("*.md")) if page.name != "scaling.md"]
    files = [REPO / "Makefile", REPO / "README.md", *docs, REPO / "tests" / "helpers" / "processes.py"]
    for folder, pattern in (("conf", "*.yaml"), ("src", "*.py"), ("pipelines", "*.py"), ("benchmarks", "*.py")):
        files += sorted((REPO / folder).rglob(pattern))
    return [path for path in files if ".venv" not in path.parts]


def test_every_server_the_project_starts_or_documents_listens_on_loopback():
    """`--host` in the Makefile, README, docs, configs and code: 127.0.0.1, or make's UI_HOST (which defaults to it)."""
    hosts = {
        (path.relative_to(REPO).as_posix(), host)
        for path in project_text_files()
        for host in re.findall(r"--host(?:=|\s+|[\"'],\s*[\"'])([^\s\"'`,]+)", path.read_text(errors="replace"))
    }
    assert hosts, "no server command found: the pattern is wrong"
    assert {(name, host) for name, host in hosts if host not in (LOOPBACK, "$(UI_HOST)")} == set()
    # documented, and the tests' own server
    assert {("docs/tracking.md", LOOPBACK), ("tests/helpers/processes.py", LOOPBACK)} <= hosts
    for config in sorted((REPO / "conf").rglob("*.yaml")):
        assert "0.0.0.0" not in config.read_text(), f"{config} names a wildcard address"
