"""Secrets never leave the process in plain text, and names never reach a shell script or YAML unquoted.

The rule (vaelab.redaction): a key naming a password, token, secret, credential or key of that kind is secret, so is
the password of any URL, and a value read from the environment (`${oc.env:VAR}`) is written as that interpolation.
The end-to-end tests plant secrets of every shape in a run, a sweep and a search, then read every byte vaelab wrote
under the project (files, checkpoints, the MLflow and Optuna databases) for their plain values.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from helpers.config import CONF, REPO, TINY, TINY_TRIAL, make_config, make_search_config
from helpers.processes import free_port, subprocess_env
from helpers.stores import all_runs, mlflow_client
from vaelab.config import search_problems, validate
from vaelab.errors import ConfigError, VaelabError, exit_on_user_error
from vaelab.redaction import is_secret_key, plain_secrets, redact_config, redact_override, redact_text
from vaelab.search.config import Settings
from vaelab.search.report import write_report
from vaelab.stages.train import train
from vaelab.tracking.run import Run, public_config
from vaelab.tracking.store import check_server

TESTS = REPO / "tests"

# Planted secrets: each plain value must appear nowhere.
TOKEN = "tok-7f3a9c1e55"  # callbacks.notify.api_token, given in plain text
DB_PASSWORD = "pw-b52e08d4c1"  # callbacks.notify.db.password, in plain text
HOOK_PASSWORD = "hook-91c4e7aa3f"  # the password of callbacks.notify.webhook's URL
ENV_SECRET = "env-3d8f1b20b7"  # callbacks.notify.my_secret_key, read from the environment
ENV_VAR = "VAELAB_TEST_SECRET_KEY"
PLANTED = (TOKEN, DB_PASSWORD, HOOK_PASSWORD, ENV_SECRET)

NOTIFIER = (
    "+callbacks.notify={_target_:helpers.notify.Notifier,"
    f"api_token:{TOKEN},my_secret_key:'${{oc.env:{ENV_VAR}}}',"
    f"webhook:'https://bot:{HOOK_PASSWORD}@hooks.example.org/vaelab',db:{{password:{DB_PASSWORD}}}}}"
)


def leaks(folders: list[Path], secrets: tuple[str, ...], text: str = "") -> dict[str, list[str]]:
    """Which files under `folders` (every byte: checkpoints, sqlite databases, YAML, CSV) hold which secrets."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                hits = [secret for secret in secrets if secret.encode() in data]
                if hits:
                    found[str(path)] = hits
    hits = [secret for secret in secrets if secret in text]
    if hits:
        found["the console"] = hits
    return found


def run_script(script: str, *args: str, root: Path, **env: str) -> subprocess.CompletedProcess:
    """A pipelines/ entry point against `root`, with tests/ on PYTHONPATH (for helpers.notify)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / script), *args],
        cwd=root,
        env=subprocess_env(VAELAB_ROOT=str(root), PYTHONPATH=path, **{ENV_VAR: ENV_SECRET}, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def succeeded(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


# The rule


@pytest.mark.parametrize(
    "key",
    [
        "db.password",
        "+tracking.api_token",
        "my_secret_key",
        "store.Secret_Key",
        "callbacks.notify.API-Key",
        "smtp.passwd",
        "vault.credentials",
        "ssh.private_key",
        "a.passphrase",
        "secrets.anything",
    ],
)
def test_a_key_naming_a_secret_is_secret_in_any_case_and_spelling(key: str):
    assert is_secret_key(key)
    assert redact_override(f"{key}=hunter2") == f"{key}=***"
    assert redact_text(f"failed: {key}=hunter2 seed=0") == f"failed: {key}=*** seed=0"


@pytest.mark.parametrize("key", ["model.latent_dim", "tracking.uri", "data.root", "hydra.sweeper.study_name", "seed"])
def test_other_keys_are_not_secret(key: str):
    assert not is_secret_key(key)
    assert redact_override(f"{key}=4") == f"{key}=4"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://user:pw@host/db", "postgresql+psycopg://user:***@host/db"),
        ("http://user:pw@host:5000", "http://user:***@host:5000"),
        ("https://u:p%40ss-w0rd@mlflow.example.org/api?x=1", "https://u:***@mlflow.example.org/api?x=1"),
        ("mysql://root:@localhost/db", "mysql://root:***@localhost/db"),
        ("https://host/hook?token=abc123&channel=x", "https://host/hook?token=***&channel=x"),
        ("postgresql+psycopg://vaelab@db-host:5432/optuna", "postgresql+psycopg://vaelab@db-host:5432/optuna"),
        ("http://127.0.0.1:5000/path", "http://127.0.0.1:5000/path"),
    ],
)
def test_a_urls_password_is_secret_in_any_value_and_any_text(url: str, shown: str):
    assert redact_text(url) == shown
    assert redact_text(f"the server at {url} cannot be reached") == f"the server at {shown} cannot be reached"
    assert redact_override(f"tracking.uri={url}") == f"tracking.uri={shown}"


def test_inline_dicts_json_and_reprs_lose_their_secret_values():
    assert redact_override("+callbacks.n={_target_:a.B,api_token:abc,db:{password:'p w'},x:1}") == (
        "+callbacks.n={_target_:a.B,api_token:***,db:{password:'***'},x:1}"
    )
    assert redact_text('{"api_token": "abc", "n": "1"}') == '{"api_token": "***", "n": "1"}'
    assert redact_text("{'my_secret_key': 'abc', 'n': 1}") == "{'my_secret_key': '***', 'n': 1}"


def test_an_interpolation_is_no_secret_and_stays_so_that_the_value_can_be_read_again():
    assert redact_override("+db.password=${oc.env:DB_PASSWORD}") == "+db.password=${oc.env:DB_PASSWORD}"
    assert redact_text("x.api_token=${oc.env:T} y=1") == "x.api_token=${oc.env:T} y=1"


def test_a_config_keeps_interpolations_from_the_environment_and_loses_secrets(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAELAB_TEST_URI", "http://alice:s3cr3t@mlflow:5000")
    monkeypatch.setenv("VAELAB_TEST_PATH", "/home/alice/private")
    cfg = make_config(
        *TINY,
        "+x.password=hunter2",
        "+x.api_token=${oc.env:VAELAB_TEST_URI}",
        "+x.uri=https://bob:pa55@host/db",
        "+x.path=${oc.env:VAELAB_TEST_PATH}/data",
        "+x.copy=${x.path}",  # through another key: still the environment's value
        "+x.size=${model.latent_dim}",
        "+x.secrets=[a1b2c3, {token: d4e5}]",
    )
    public = public_config(cfg)["x"]
    assert public == {
        "password": "***",
        "api_token": "${oc.env:VAELAB_TEST_URI}",
        "uri": "https://bob:***@host/db",
        "path": "${oc.env:VAELAB_TEST_PATH}/data",
        "copy": "${x.path}",
        "size": 4,
        "secrets": ["***", {"token": "***"}],
    }
    assert public_config(cfg)["model"] == {"latent_dim": 4}
    # read back, the config resolves the environment again
    assert OmegaConf.create(public_config(cfg))["x"]["copy"] == "/home/alice/private/data"
    assert redact_config({"a": {"token": "${oc.env:X}", "password": "p"}}) == {
        "a": {"token": "${oc.env:X}", "password": "***"}
    }


def test_only_literal_secrets_are_plain():
    raw = {"a": {"password": "p", "token": "${oc.env:T}", "uri": "http://u:pw@h", "url": "${oc.env:U}"}, "b": None}
    assert plain_secrets(raw) == ["a.password", "a.uri"]


# Error messages


def test_an_unset_environment_variable_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("VAELAB_TEST_UNSET", raising=False)
    cfg = make_config(*TINY, "+callbacks.notify={_target_:a.B,api_token:'${oc.env:VAELAB_TEST_UNSET}'}")
    with pytest.raises(
        ConfigError,
        match="callbacks.notify.api_token='\\$\\{oc.env:VAELAB_TEST_UNSET\\}': allowed an "
        "interpolation that resolves .*Environment variable 'VAELAB_TEST_UNSET' not found",
    ):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "key", "secret"),
    [
        ("+db.password=hunter2-db", "db", "hunter2-db"),  # the schema names the unknown top key
        ("+tracking.api_token=abc123xyz-tok", "tracking.api_token", "abc123xyz-tok"),
        ("+my_secret_key=k3y-s3cr3t", "my_secret_key", "k3y-s3cr3t"),
        ("+db={password:12345678}", "db", "12345678"),
        ("tracking.uri=mongodb://u:pw-in-uri@host/db", "tracking.uri", "pw-in-uri"),
        ("hydra.sweeper.storage=Postgres://u:pw-in-storage@h/db", "hydra.sweeper.storage", "pw-in-storage"),
    ],
)
def test_a_config_error_names_the_key_but_never_quotes_a_secret(override: str, key: str, secret: str, capsys):
    cfg = make_search_config(*TINY, "hparams_search=default", override)
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
        raise ConfigError(search_problems(cfg, cfg.hydra.sweeper))
    assert f"{key}=" in str(raised.value)
    assert secret not in str(raised.value) and secret not in repr(raised.value.problems)
    with pytest.raises(SystemExit), exit_on_user_error():
        raise raised.value
    assert secret not in capsys.readouterr().err


def test_an_unreachable_servers_url_is_named_without_its_password():
    with pytest.raises(VaelabError) as raised:
        check_server(f"http://alice:pw-unreachable@127.0.0.1:{free_port()}")
    assert "http://alice:***@127.0.0.1" in str(raised.value) and "pw-unreachable" not in str(raised.value)


@pytest.mark.integration
def test_tags_and_failure_reasons_lose_their_secrets_on_the_way_to_mlflow(project: Path):
    overrides = ["+db.password=hunter2", "tracking.run_name=r", "+x.uri=http://u:pw-tag@h"]
    run = Run.create(make_config(*TINY), "train", overrides=overrides, tags={"note": "api_token=abc-tag"})
    run.set_tags({"vaelab.job_overrides": json.dumps(overrides), "vaelab.best_command": shlex.join(overrides)})
    run.end("FAILED", reason="OperationalError: cannot reach postgresql://u:pw-reason@db/x")
    recorded = mlflow_client(project).get_run(run.run_id).data
    text = json.dumps([recorded.tags, recorded.params])
    for secret in ("hunter2", "pw-tag", "abc-tag", "pw-reason"):
        assert secret not in text, secret
    assert recorded.tags["vaelab.failure"] == "OperationalError: cannot reach postgresql://u:***@db/x"
    assert "+db.password=*** tracking.run_name=r" in recorded.tags["vaelab.overrides"]


# Names in reproduce.sh and best_<study>.yaml


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "tab\there", "x\x1b[2J"])
def test_a_study_name_is_a_single_printable_line(name: str):
    cfg = make_search_config("hparams_search=default", f"hydra.sweeper.study_name='{name}'")
    found = search_problems(cfg, cfg.hydra.sweeper)
    assert found == [("hydra.sweeper.study_name", name, "a non-empty single line of printable characters")]


@pytest.mark.parametrize("name", ["x; rm -rf ~", "$(touch pwned)", "it's `here`", 'say "hi" && touch pwned'])
def test_a_study_name_with_shell_characters_is_a_name(name: str):
    cfg = make_search_config("hparams_search=default", f"hydra.sweeper.study_name={json.dumps(name)}")
    assert search_problems(cfg, cfg.hydra.sweeper) == []


def completed_study(overrides: list[str]) -> optuna.Study:
    """An in-memory study with one COMPLETE trial that ran with `overrides` (as the objective stores them)."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("overrides", overrides)
    study.tell(trial, -80.0)
    return study


@pytest.mark.integration
@pytest.mark.parametrize(
    "study_name", ["x'; touch pwned-name; '", "$(touch pwned-name)", "new\nline; touch pwned-name", "a\rb"]
)
def test_reproduce_sh_and_the_best_yaml_hold_names_and_values_as_data(project: Path, study_name: str):
    """Any study name and any override value reaches reproduce.sh shell-quoted or as a comment, and the best
    config as a YAML comment or value: running the script runs exactly the command, with exactly the overrides."""
    overrides = [
        *TINY_TRIAL,
        "tracking.run_name='$(touch pwned-value); `touch pwned-value`'",
        "tracking.experiment='x\ny: injected\n#'",
        "objective.beta=1.5",
    ]
    cfg = make_search_config(
        *TINY_TRIAL, "hparams_search=default", f"hydra.sweeper.study_name={json.dumps(study_name)}"
    )
    settings = Settings.from_config(cfg.hydra.sweeper, "default", {"objective.beta": "tag(log, interval(0.25, 4.0))"})
    parent = Run.create(make_config(*TINY_TRIAL), "search", [], tags={}, log_params=False)
    write_report(completed_study(overrides), settings, CONF, parent)

    folder = project / "outputs" / parent.run_id
    bin_dir = project / "bin"  # a `python` that prints its arguments, one per line, as JSON strings
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s" "$a" | ' + sys.executable + " -c "
                                    "'import json,sys; print(json.dumps(sys.stdin.read()))'; done\n")  # fmt: skip
    (bin_dir / "python").chmod(stat.S_IRWXU)
    done = subprocess.run(
        ["sh", str(folder / "reproduce.sh")],
        cwd=project,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == ["pipelines/train.py", *overrides]
    assert not list(project.rglob("pwned*"))

    [best_file] = folder.glob("experiment/best_*.yaml")
    text = best_file.read_text()
    document = yaml.safe_load(text)
    assert set(document) == {"defaults", "tracking", "objective", "trainer", "eval", "arch"}
    assert document["tracking"] == {
        "run_name": "$(touch pwned-value); `touch pwned-value`",
        "experiment": "x\ny: injected\n#",
    }
    head = text[: text.index("\ndefaults:")]
    assert all(line.startswith("#") for line in head.splitlines())  # the header: comments only


# Resume: the interpolation is kept, the secret is read again


@pytest.mark.integration
def test_a_run_given_a_secret_from_the_environment_resumes_with_it_again(project: Path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, ENV_SECRET)
    notifier = f"+callbacks.notify={{_target_:helpers.notify.Notifier,api_token:'${{oc.env:{ENV_VAR}}}'}}"
    first = train(make_config(*TINY, notifier))
    stored = (project / "outputs" / first["run_id"] / "config.yaml").read_text()
    assert f"api_token: ${{oc.env:{ENV_VAR}}}" in stored and ENV_SECRET not in stored

    # The Notifier refuses anything but the real secret: the resumed run read it from the environment again. (It is
    # the test's own callback, so the resume names it as trusted.)
    trusted = [f"+resume.run={first['run_id']}", "+resume.trust=[helpers.notify.Notifier]"]
    assert train(make_config(*trusted))["run_id"] == first["run_id"]

    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(VaelabError, match=f"its callbacks.notify.api_token is read from the environment.*{ENV_VAR}"):
        train(make_config(f"resume={first['run_id']}"))


@pytest.mark.integration
def test_a_run_given_a_secret_in_plain_text_stores_none_and_says_it_cannot_resume(project: Path):
    notifier = f"+callbacks.notify={{_target_:helpers.notify.Notifier,api_token:{TOKEN}}}"
    first = train(make_config(*TINY, "trainer.max_epochs=1", notifier))
    assert leaks([project / "outputs", project / "models"], (TOKEN,)) == {}
    with pytest.raises(VaelabError, match="its callbacks.notify.api_token held a secret in plain text"):
        train(make_config(f"resume={first['run_id']}"))


# DVC: params.yaml keeps an escaped interpolation; a plain secret there gets a warning


def test_dvc_keeps_an_escaped_environment_interpolation_in_params_yaml(tmp_path: Path):
    from vaelab.params import compose_params

    escaped = r"+callbacks.notify={_target_:helpers.notify.Notifier,api_token:'\${oc.env:VAELAB_TEST_TOKEN}'}"
    params = yaml.safe_load(compose_params([escaped], tmp_path / "params.yaml").read_text())
    assert params["callbacks"]["notify"]["api_token"] == "${oc.env:VAELAB_TEST_TOKEN}"


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("secret", "warned"),
    [
        (f"api_token:{TOKEN}", "callbacks.notify.api_token"),
        (rf"api_token:'\${{oc.env:T}}',webhook:'https://bot:{HOOK_PASSWORD}@h.org'", "callbacks.notify.webhook"),
        (r"api_token:'\${oc.env:VAELAB_TEST_TOKEN}'", None),
    ],
)
def test_the_train_stage_warns_of_a_plain_secret_in_params_yaml(tmp_path: Path, secret: str, warned: str | None):
    from vaelab.params import compose_params

    notifier = f"+callbacks.notify={{_target_:helpers.notify.Notifier,{secret}}}"
    compose_params([notifier, "model.latent_dim=0"], tmp_path / "params.yaml")  # invalid: stops after the warning
    done = run_script(
        "train.py", "--config-dir", str(tmp_path), "--config-name", "params", "hydra.run.dir=.",
        "hydra.output_subdir=null", root=tmp_path, T="t0k3n-t", VAELAB_TEST_TOKEN="t0k3n-v",
    )  # fmt: skip
    assert done.returncode == 2 and "model.latent_dim=0" in done.stderr, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    if warned is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert f"params.yaml holds a secret in plain text ({warned})" in warning
        assert f"dvc exp run -S '{warned}=\\${{oc.env:VAR}}'" in warning
    assert TOKEN not in done.stderr and HOOK_PASSWORD not in done.stderr


# End to end: every byte a run, a sweep and a search write


@pytest.mark.subprocess
def test_a_run_writes_its_secrets_nowhere(project: Path, mlflow_server):
    uri, store = mlflow_server
    password = "mlf-5a7c3e9d21"  # the tracking server's, in tracking.uri (the server asks for none: it is ignored)
    tracking = uri.replace("http://", f"http://alice:{password}@")
    done = run_script(
        "train.py", *TINY, NOTIFIER, "logger=mlflow_server", f"tracking.uri={tracking}", "publish=true", root=project
    )
    console = succeeded(done)

    assert leaks([project, store], (*PLANTED, password), console) == {}
    [run_dir] = [path for path in (project / "outputs").iterdir() if path.is_dir()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["callbacks"]["notify"] == {
        "_target_": "helpers.notify.Notifier",
        "api_token": "***",
        "my_secret_key": f"${{oc.env:{ENV_VAR}}}",
        "webhook": "https://bot:***@hooks.example.org/vaelab",
        "db": {"password": "***"},
    }
    assert config["tracking"]["uri"] == tracking.replace(password, "***")
    assert (project / "models" / "latest" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_sweep_writes_its_secrets_nowhere(project: Path):
    one_epoch = [o for o in TINY if not o.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=1"]
    succeeded(run_script("train.py", "-m", *one_epoch, NOTIFIER, "seed=0,1", root=project))

    assert leaks([project], PLANTED) == {}
    runs = all_runs(project)
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    for run in children:
        assert "api_token:***" in json.loads(run.data.tags["vaelab.job_overrides"])[-2]
    [multirun] = project.glob("outputs/multirun/*/multirun.yaml")
    assert "api_token:***" in multirun.read_text()


SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    *TINY_TRIAL,
    "objective.beta=interval(0.5,2)",
    "hydra/sweeper/sampler=random",
    "hydra.sweeper.sampler.seed=0",
    "hydra/sweeper/pruner=none",
    "hydra.sweeper.n_trials=2",
]


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_search_writes_its_secrets_nowhere(project: Path):
    console = succeeded(run_script("train.py", *SEARCH, NOTIFIER, root=project))

    assert leaks([project], PLANTED, console) == {}
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{project / 'optuna.db'}")
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "COMPLETE"]
    [reproduce] = project.glob("outputs/*/reproduce.sh")
    assert "api_token:***" in reproduce.read_text() and "Secrets are not stored" in reproduce.read_text()


@pytest.mark.slow
def test_a_search_on_postgresql_names_its_storage_without_the_password(project: Path, tmp_path: Path):
    from test_postgres import create_databases, running_postgres

    password = "pg-0c9e7d5b13"  # trust authentication: the server ignores it
    with running_postgres(tmp_path / "postgres.log") as server:
        create_databases(server, "optuna")
        storage = server.replace("@", f":{password}@") + "/optuna"
        console = succeeded(run_script("train.py", *SEARCH, f"hydra.sweeper.storage={storage}", root=project))
        import psycopg

        with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/optuna") as db:
            tables = [row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            stored = " ".join(str(row) for table in tables for row in db.execute(f'SELECT * FROM "{table}"'))
    assert leaks([project], (password,), console + stored) == {}
    [parent] = [run for run in all_runs(project) if run.data.tags.get("vaelab.kind") == "search"]
    assert parent.data.tags["optuna.storage"] == storage.replace(password, "***")
