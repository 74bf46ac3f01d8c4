"""A valid-looking config fails before training, never after: every value that would fail once the run has trained
is rejected up front (one line naming the key or the file, exit status 2, no MLflow run) or works.

Classes of fault, each with several values: non-finite numbers, seeds beyond 32 bits, malformed tracking URIs,
model names MLflow refuses, Trainer and optimizer arguments Lightning and torch refuse, stores that cannot be used,
an experiment in MLflow's trash. Experiment names never lead artifacts out of the store's artifact folder.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

from helpers.config import REPO, TINY, TINY_TRIAL, make_config, make_search_config
from helpers.filesystems import tmpfs
from helpers.processes import run_entry, subprocess_env
from helpers.stores import all_runs, artifact_paths, mlflow_client
from vaelab.config import problems, search_problems
from vaelab.errors import ConfigError, VaelabError
from vaelab.search.config import Settings
from vaelab.search.study import build_sampler
from vaelab.stages.evaluate import evaluate
from vaelab.stages.preflight import check_buildable
from vaelab.stages.train import train
from vaelab.tracking.store import check_store, ensure_experiment, folder_name, resolve_uri
from vaelab.training.module import NonFiniteLossError

# Class of fault: a number that is not finite, where a finite one is asked for.
NON_FINITE = [
    ("objective.beta=inf", "objective.beta"),
    ("objective.free_bits=inf", "objective.free_bits"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("objective=capacity objective.gamma=inf", "objective.gamma"),
    ("objective=capacity objective.nats=inf", "objective.nats"),
    ("likelihood=gaussian likelihood.min_std=inf", "likelihood.min_std"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),
    ("scheduler=cosine +scheduler.eta_min=inf", "scheduler.eta_min"),
]

# Class of fault: a seed that numpy and Lightning cannot take (unsigned 32-bit).
SEEDS = [
    ("seed=4294967296", "seed"),
    ("seed=18446744073709551616", "seed"),
    ("data.split_seed=4294967296", "data.split_seed"),
    ("data.binarize_seed=99999999999", "data.binarize_seed"),
]

# Class of fault: a tracking URI that is not one MLflow can open.
MALFORMED_URIS = [
    "sqlite:///",
    "sqlite:///folder/",
    "http://",
    "https://:5000",
    "http://host:99999",
    "http://host:port",
    "http://exa mple.com",
    "file:",
    "postgresql",
    "mysql://",
    "mlruns",
]
WELL_FORMED_URIS = [
    "sqlite:///mlflow.db",
    "sqlite:///stores/mlflow.db?timeout=20",
    "sqlite:////abs/mlflow.db",
    "http://127.0.0.1:5000",
    "https://mlflow.example.org",
    "file:///tmp/mlruns",
    "postgresql+psycopg://user@host/mlflow",
    "databricks",
]

# Class of fault: a model registry name that MLflow refuses at registration, after training.
BAD_MODEL_NAMES = ["bad/name", "a:b", "..", "..hidden", "   "]

# Class of fault: Trainer arguments that Lightning refuses when the Trainer is built.
TRAINER_REFUSALS = [
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=-2", "trainer.devices"),
    ("trainer.precision=bogus", "trainer.precision"),
    ("trainer.precision=17", "trainer.precision"),
    ("trainer.accelerator=tpuu", "trainer.accelerator"),
    ("+trainer.strategy=dpp", "trainer.strategy"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("+trainer.max_epoch=3", "trainer.max_epoch"),
]

# Class of fault: an optimizer (or schedule) that torch cannot build.
OPTIMIZER_REFUSALS = [
    ("optim._target_=torch.optim.Adamm", "optim._target_"),
    ("optim._target_=torch.optim.adam", "optim._target_"),
    ("optim._target_=torch.optim.lr_scheduler.StepLR", "optim._target_"),
    ("optim._target_=vaelab.model.vae.VAE", "optim._target_"),
    ("optim._target_=os.system", "optim._target_"),
    ("optim._target_=torch.optim.LBFGS", "optim.weight_decay"),  # an optimizer without weight decay
]


def no_gpu() -> bool:
    return not torch.cuda.is_available()


def count_runs(db: Path) -> int:
    """Every run in the sqlite store, deleted experiments' too (0 when there is no store)."""
    if not db.exists():
        return 0
    with closing(sqlite3.connect(db)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return connection.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0


def vaelab_lines(stderr: str) -> list[str]:
    """vaelab's own message: from its first `vaelab:` line on (MLflow may log before it)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("vaelab:")]
    return lines[starts[0] :] if starts else lines


def assert_refused_before_any_run(done: subprocess.CompletedProcess, db: Path, *named: str) -> None:
    """Exit 2, no traceback, one problem on one line (after `invalid config:` for a config error), every text in
    `named` in it, and no MLflow run."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = vaelab_lines(done.stderr)
    problem = lines[1:] if lines[0] == "vaelab: invalid config:" else lines
    assert len(problem) == 1, lines
    for text in named:
        assert text in problem[0], lines
    assert count_runs(db) == 0


def not_a_database(folder: Path) -> Path:
    path = folder / "notes.db"
    path.write_text("these are notes, not a database\n" * 50)
    return path


def damaged_database(folder: Path) -> Path:
    """A real sqlite database with its pages overwritten, as a crash of the disk would leave it."""
    path = folder / "damaged.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE runs (id TEXT, note TEXT)")
        connection.executemany("INSERT INTO runs VALUES (?, ?)", [(str(i), "x" * 500) for i in range(200)])
        connection.commit()
    data = bytearray(path.read_bytes())
    data[120:20000] = b"\xa5" * (20000 - 120)
    path.write_bytes(bytes(data))
    return path


def trashed_experiment(project: Path, name: str = "vaelab") -> str:
    """The default store, holding an experiment `name` that was deleted (it sits in MLflow's trash)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, name)
    MlflowClient(uri).delete_experiment(experiment_id)
    return experiment_id


# The schema: values rejected by key


@pytest.mark.parametrize(("override", "key"), NON_FINITE + SEEDS)
def test_non_finite_numbers_and_seeds_beyond_32_bits_are_rejected_by_key(override: str, key: str):
    assert [k for k, _, _ in problems(make_config(*override.split()))] == [key]


def test_the_largest_seeds_are_accepted():
    assert problems(make_config("seed=4294967295", "data.split_seed=4294967295")) == []


def sampler_seeded(seed: int):
    """The search's sampler as the search builds it (before any study or run), its seed `seed`."""
    cfg = make_search_config(f"hydra.sweeper.sampler.seed={seed}")
    assert search_problems(cfg, cfg.hydra.sweeper) == []  # the seed is the sampler's argument, judged as it is built
    return build_sampler(Settings.from_config(cfg.hydra.sweeper, "command line", {}), 0)


def test_a_search_seed_has_the_same_bound_and_is_refused_by_its_key():
    assert sampler_seeded(4294967295) is not None
    with pytest.raises(ConfigError) as refused:
        sampler_seeded(4294967296)
    [(key, value, allowed)] = refused.value.problems
    assert key == "hydra.sweeper.sampler" and "4294967296" in str(value) and "Seed must be between" in allowed


@pytest.mark.parametrize("uri", MALFORMED_URIS)
def test_a_malformed_tracking_uri_is_rejected(uri: str):
    [(key, value, allowed)] = problems(make_config(f"tracking.uri='{uri}'"))
    assert (key, value) == ("tracking.uri", uri)
    assert "sqlite:///<file>" in allowed


@pytest.mark.parametrize("uri", WELL_FORMED_URIS)
def test_a_well_formed_tracking_uri_is_accepted(uri: str):
    assert problems(make_config(f"tracking.uri='{uri}'")) == []


@pytest.mark.parametrize("name", BAD_MODEL_NAMES)
def test_a_model_name_the_registry_refuses_is_rejected_before_training(name: str):
    [(key, value, _)] = problems(make_config(f"tracking.register_as='{name}'"))
    assert (key, value) == ("tracking.register_as", name)


def test_an_experiment_name_over_mlflows_limit_is_rejected():
    assert problems(make_config(f"tracking.experiment={'x' * 500}")) == []
    assert [k for k, _, _ in problems(make_config(f"tracking.experiment={'x' * 501}"))] == ["tracking.experiment"]


# What only Lightning and torch can judge, judged before the run


@pytest.mark.parametrize(("override", "key"), TRAINER_REFUSALS + OPTIMIZER_REFUSALS)
def test_trainer_and_optimizer_arguments_are_judged_by_building_them(override: str, key: str):
    cfg = make_config(*TINY, *override.split())
    with pytest.raises(ConfigError) as error:
        check_buildable(cfg)
    assert [k for k, _, _ in error.value.problems] == [key]


@pytest.mark.skipif(not no_gpu(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_names_the_accelerator():
    with pytest.raises(ConfigError) as error:
        check_buildable(make_config(*TINY, "trainer.accelerator=gpu"))
    assert [k for k, _, _ in error.value.problems] == ["trainer.accelerator"]


def test_the_default_and_the_cosine_schedule_build():
    check_buildable(make_config(*TINY))
    check_buildable(make_config(*TINY, "scheduler=cosine", "optim._target_=torch.optim.SGD"))


# The store


def test_a_relative_sqlite_uri_is_a_file_under_the_store_root(project: Path, monkeypatch: pytest.MonkeyPatch):
    assert resolve_uri("sqlite:///relative.db") == f"sqlite:///{project / 'relative.db'}"
    assert resolve_uri("sqlite:///a/b.db?timeout=20") == f"sqlite:///{project / 'a' / 'b.db'}?timeout=20"
    assert resolve_uri(f"sqlite:///{project / 'abs.db'}") == f"sqlite:///{project / 'abs.db'}"  # already absolute
    monkeypatch.setenv("DVC_ROOT", str(project.parent))  # under DVC: beside the original repository's stores
    assert resolve_uri("sqlite:///relative.db") == f"sqlite:///{project.parent / 'relative.db'}"


def test_a_queued_dvc_experiment_logs_to_its_repositorys_stores_not_its_temporary_copy(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    from vaelab import paths

    copy = project / ".dvc" / "tmp" / "exps" / "tmpabc123"  # where `dvc exp run --queue` runs a stage; deleted after
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert paths.store_root() == project.resolve()
    assert resolve_uri("sqlite:///relative.db") == f"sqlite:///{project.resolve() / 'relative.db'}"


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (not_a_database, "file is not a database"),
        (damaged_database, "malformed"),
        (lambda folder: (folder / "folder.db").mkdir() or folder / "folder.db", "is not a file"),
        (lambda folder: not_a_database(folder) / "mlflow.db", "is a file, not a folder"),
        (lambda folder: folder / "missing" / "mlflow.db", "does not exist"),
    ],
    ids=["not-a-database", "damaged", "a-folder", "file-in-the-way", "missing-folder"],
)
def test_an_unusable_store_is_named_before_it_is_used(tmp_path: Path, make, named: str):
    db = make(tmp_path)
    uri = f"sqlite:///{db}"
    with pytest.raises(VaelabError, match=named) as error:
        check_store(uri)
    assert str(db) in str(error.value) or str(db.parent) in str(error.value)
    with pytest.raises(VaelabError, match=named):
        ensure_experiment(uri, "vaelab")  # what every run, sweep and search goes through first


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder`, unwritable: by its mode, or for root (whom modes do not bind) as a read-only tmpfs."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m"):
        yield folder


def test_a_read_only_store_folder_is_named(tmp_path: Path):
    with read_only(tmp_path / "store") as folder, pytest.raises(VaelabError, match=f"{folder} is not writable"):
        check_store(f"sqlite:///{folder / 'mlflow.db'}")


def test_the_default_store_and_a_new_file_in_an_existing_folder_are_fine(project: Path, tmp_path: Path):
    check_store(None)
    check_store(f"sqlite:///{tmp_path / 'new.db'}")
    check_store("sqlite:///relative.db")


def test_an_experiment_in_mlflows_trash_says_how_to_restore_or_purge_it(project: Path):
    experiment_id = trashed_experiment(project, "old")
    with pytest.raises(VaelabError) as error:
        ensure_experiment(f"sqlite:///{project / 'mlflow.db'}", "old")
    message = str(error.value)
    assert "tracking.experiment='old'" in message and "trash" in message
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in message
    store = f"sqlite:///{project / 'mlflow.db'}"
    assert f"mlflow gc --backend-store-uri {store} --experiment-ids {experiment_id}" in message
    assert "\n" not in message


# Names cannot escape the project

ESCAPING_NAMES = ["/abs/path", "../../..", "..", ".", "a/b/../../../c", "line\nbreak", "back\\slash", "x" * 500]


def test_experiment_names_become_distinct_single_folder_names():
    folders = [folder_name(name) for name in ESCAPING_NAMES]
    assert len(set(folders)) == len(folders)
    for folder in folders:
        assert "/" not in folder and "\n" not in folder and folder.strip(".") and len(folder.encode()) <= 200
    assert folder_name("vaelab") == "vaelab"  # an ordinary name stays readable


def test_every_artifact_lands_under_the_projects_artifact_root_whatever_the_experiment_name(project: Path):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    artifact = project / "note.txt"
    artifact.write_text("hello")
    root = (project / "mlartifacts").resolve()
    for name in ESCAPING_NAMES:
        run = client.create_run(ensure_experiment(uri, name))
        client.log_artifact(run.info.run_id, str(artifact))
        assert client.get_experiment_by_name(name) is not None  # MLflow keeps the name as given
    written = [path.resolve() for path in project.parent.rglob("note.txt") if path != artifact]
    assert len(written) == len(ESCAPING_NAMES)
    assert all(path.is_relative_to(root) for path in written), written


# Figures and skipped steps: values that must work, or fail at once


class PoisonEveryBatch(Callback):
    """Every training batch NaN from `epoch` on: each step's loss is NaN, and nan_policy=skip skips it."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= self.epoch:
            batch.fill_(float("nan"))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "callbacks", "epoch"),
    [
        (["optim.lr=1e30"], [], None),  # diverges in its first steps
        ([], [PoisonEveryBatch(0)], 0),
        (["trainer.max_epochs=3"], [PoisonEveryBatch(1)], 1),
    ],
    ids=["diverged", "all-from-the-start", "all-from-epoch-1"],
)
def test_an_epoch_of_only_skipped_steps_fails_at_once_naming_the_cause(project: Path, overrides, callbacks, epoch):

    with pytest.raises(NonFiniteLossError, match="every training step of epoch") as error:
        train(make_config(*TINY, "nan_policy=skip", *overrides), callbacks=callbacks)
    if epoch is not None:
        assert f"epoch {epoch} " in str(error.value)
    [run] = all_runs(project)
    assert run.info.status == "FAILED"
    assert "every training step of epoch" in run.data.tags["vaelab.failure"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        ["model.latent_dim=1"],
        ["data.val_size=1"],
        ["eval.val_limit=1", "model.latent_dim=1"],
        ["eval.val_limit=3", "model.latent_dim=3"],
    ],
)
def test_one_latent_or_a_handful_of_validation_images_still_trains_and_draws_every_figure(project: Path, overrides):

    train(make_config(*TINY, "trainer.max_epochs=1", *overrides))
    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    figures = {p for p in artifact_paths(mlflow_client(project), run.info.run_id) if p.startswith("figures/")}
    assert len(figures) == 7, figures


@pytest.mark.integration
@pytest.mark.parametrize("limit", [1, 2])
def test_evaluating_a_handful_of_test_images_draws_every_figure(project: Path, limit: int):

    run_id = train(make_config(*TINY, "trainer.max_epochs=1", "model.latent_dim=1"))["run_id"]
    summary = evaluate(make_config(*TINY, "model.latent_dim=1", f"eval.limit={limit}"))
    assert summary["eval/n_images"] == limit
    assert len(list((project / "outputs" / run_id / "evaluation").glob("*.png"))) == 6


# Each entry point family: exit 2, one line, no run


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["seed=4294967296"], ["seed=4294967296"]),
        (["objective.beta=inf"], ["objective.beta=inf"]),
        (["optim.lr=inf", "nan_policy=skip"], ["optim.lr=inf"]),
        (["optim._target_=torch.optim.Adamm"], ["optim._target_='torch.optim.Adamm'"]),
        (["trainer.devices=0"], ["trainer.devices=0"]),
        (["trainer.precision=bogus"], ["trainer.precision='bogus'"]),
        (["tracking.register_as=bad/name"], ["tracking.register_as='bad/name'"]),
        (["tracking.uri=http://"], ["tracking.uri='http://'"]),
    ],
)
def test_train_refuses_before_any_run(project: Path, overrides, named):
    done = run_entry("train.py", *TINY, *overrides, root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", *named)


@pytest.mark.subprocess
@pytest.mark.slow
def test_train_refuses_an_unusable_store_or_a_trashed_experiment_before_any_run(project: Path):
    db = not_a_database(project)
    done = run_entry("train.py", *TINY, f"tracking.uri=sqlite:///{db}", root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", str(db), "not a database")

    trashed_experiment(project)
    done = run_entry("train.py", *TINY, root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", "trash", "mlflow experiments restore")


@pytest.mark.subprocess
def test_train_with_a_relative_sqlite_uri_uses_the_file_under_the_project_and_records_it_absolute(project: Path):
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(  # started from another folder: the file is still the project's
        [sys.executable, str(REPO / "pipelines" / "train.py"), *TINY, "tracking.uri=sqlite:///stores.db"],
        cwd=elsewhere,
        env=subprocess_env(VAELAB_ROOT=str(project)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(elsewhere.iterdir())
    client = MlflowClient(f"sqlite:///{project / 'stores.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == f"sqlite:///{project / 'stores.db'}"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(project)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["seed=4294967296"], ["seed=4294967296"]),
        (["tracking.uri=sqlite:///"], ["tracking.uri='sqlite:///'"]),
        (["tracking.uri=sqlite:///notes.db"], ["notes.db", "not a database"]),
    ],
)
def test_evaluate_refuses_before_touching_a_run(project: Path, overrides, named):
    not_a_database(project)
    done = run_entry("evaluate.py", *TINY, *overrides, root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", *named)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["objective.beta=inf"], ["objective.beta=inf"]),
        (["trainer.devices=0"], ["trainer.devices=0"]),
        (["optim._target_=torch.optim.Adamm"], ["optim._target_='torch.optim.Adamm'"]),
        (["hparams_search=nope"], ["hparams_search='nope'"]),
        (["hydra.sweeper.n_trials=0"], ["hydra.sweeper.n_trials=0"]),
    ],
)
def test_search_refuses_before_any_study_or_run(project: Path, overrides, named):
    search = ["-m", "hydra/sweeper=optuna", "model.latent_dim=int(interval(2,8))", "hydra.sweeper.n_trials=2"]
    done = run_entry("train.py", *search, *TINY_TRIAL, *overrides, root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", *named)
    assert not (project / "optuna.db").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("ddp", [["trainer=ddp_cpu"], ["trainer=default,ddp_cpu"]], ids=["every-job", "one-job"])
def test_a_sweep_of_ddp_jobs_whose_ranks_lightning_would_start_is_refused_before_its_parent_run(
    project: Path, ddp: list[str]
):
    """Lightning starts a DDP job's further ranks with the command line it was given: here the whole sweep."""
    done = run_entry("train.py", "-m", *TINY_TRIAL, "model.latent_dim=2,3", *ddp, root=project, check=False)
    assert_refused_before_any_run(
        done, project / "mlflow.db", "cannot start the sweep", "trainer.strategy='ddp'", "hydra/launcher=basic"
    )


@pytest.mark.subprocess
@pytest.mark.parametrize("fault", ["not-a-database", "trashed-experiment"])
def test_a_sweep_refuses_an_unusable_store_before_its_parent_run(project: Path, fault: str):
    if fault == "not-a-database":
        store = [f"tracking.uri=sqlite:///{not_a_database(project)}"]
        named = ["notes.db", "not a database"]
    else:
        trashed_experiment(project)
        store, named = [], ["trash", "mlflow experiments restore"]
    done = run_entry("train.py", "-m", *TINY_TRIAL, "model.latent_dim=2,3", *store, root=project, check=False)
    assert_refused_before_any_run(done, project / "mlflow.db", *named)
