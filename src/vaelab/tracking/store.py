"""The MLflow store: where it is (a sqlite file at the store root by default, or a server), a check that it can be
used, a client that waits out a locked sqlite database, and the experiment, created on first use."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import quote

from filelock import FileLock

from vaelab import paths
from vaelab.errors import StoreLockedError, VaelabError
from vaelab.redaction import redact_url
from vaelab.tracking.deferral import deferring_interrupts

STORE_LOCK_TIMEOUT_S = 30.0  # default of tracking.lock_timeout_s
SQLITE = "sqlite:///"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MAX_FOLDER_NAME = 200  # bytes: below the 255 most filesystems allow, with room for a hash
# The MLflow UI shows an experiment of this kind as model training (runs, metrics, models), not as a GenAI app's
# traces, and does not ask which kind it is.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_uri() -> str:
    return f"{SQLITE}{paths.store_root() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    """The store's URI, absolute. MLflow reads `sqlite:///mlflow.db` relative to the current folder; vaelab reads it
    relative to the store root (the project, or $DVC_ROOT under DVC), so every process of a run, a sweep or a search
    opens the same file wherever it was started, and the run records where that is."""
    if not uri:
        return default_uri()
    db = _sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    _, question, query = uri.partition("?")
    return f"{SQLITE}{paths.store_root() / db}{question}{query}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (without its ?options), else None."""
    return Path(uri.removeprefix(SQLITE).partition("?")[0]) if uri.startswith(SQLITE) else None


def folder_name(name: str) -> str:
    """`name` as one folder name that stays where it is put: percent-encoded, so a `/`, a `..` or a newline in it
    leads nowhere else (plain names stay as they are). A very long name keeps its start and gains a hash."""
    encoded = quote(name, safe=" ")
    if not encoded.strip("."):  # "." and ".." are folders already
        encoded = encoded.replace(".", "%2E")
    if len(encoded.encode()) > MAX_FOLDER_NAME:
        encoded = f"{encoded[: MAX_FOLDER_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return encoded


def artifact_location(uri: str, experiment: str) -> str | None:
    """An absolute artifact folder beside a sqlite store (MLflow defaults to ./mlruns); a server picks its own.
    MLflow allows any experiment name, `/abs/path` and `../..` included: encoded, it names a folder in mlartifacts/."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts" / folder_name(experiment)).as_uri() if db else None


def check_store(uri: str | None) -> None:
    """Fail fast, naming the store, when it cannot be used: a server that does not answer, or a sqlite file that is
    not a database or is damaged, in a folder that is missing, not a folder or read-only. MLflow would otherwise
    fail only when the run is created (or retry for minutes). `uri` as configured: None is the default store."""
    resolved = resolve_uri(uri)
    if is_server(resolved):
        check_server(resolved)
    elif _sqlite_path(resolved) is not None:
        _check_sqlite(resolved, may_create_folder=uri is None)


def _check_sqlite(uri: str, may_create_folder: bool) -> None:
    db = _sqlite_path(uri)
    folder = db.parent
    where = f"the MLflow store {uri} (tracking.uri)"
    if not folder.exists():
        if may_create_folder:  # the default store's folder is the project's own
            return
        raise VaelabError(f"{where}: the folder {folder} does not exist; create it, or correct tracking.uri")
    if not folder.is_dir():
        raise VaelabError(f"{where}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # sqlite writes its journal beside the database
        raise VaelabError(f"{where}: the folder {folder} is not writable")
    if not db.exists():
        return  # MLflow creates it
    if not db.is_file():
        raise VaelabError(f"{where}: {db} is not a file")
    if not os.access(db, os.R_OK | os.W_OK):
        raise VaelabError(f"{where}: {db} is not readable and writable")
    problem = sqlite_problem(db)
    if problem:
        raise VaelabError(
            f"{where}: {db} is not a usable sqlite database ({problem}); restore it from a backup, or point "
            "tracking.uri at another file"
        )


def sqlite_problem(db: Path) -> str | None:
    """What sqlite says is wrong with the database file `db` (not a database, damaged), or None. A store locked by
    another writer is not a problem here: the client waits it out."""
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=0)) as connection:
            found = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        return None if "locked" in str(error) else str(error)
    return None if found == "ok" else found


class StoreClient:
    """An MlflowClient whose calls wait out a locked sqlite store instead of failing at once.

    Another process writing the store (a sweep's jobs, `mlflow ui`, a user's script) holds sqlite's lock; each
    attempt already waits 5 s for it (sqlite's busy timeout). Up to `lock_timeout_s` more, calls are retried;
    after that, a StoreLockedError names the store. A locked call committed nothing, so retrying never doubles
    a write, and the store is never left half-written."""

    def __init__(self, uri: str, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S):
        from mlflow import MlflowClient

        self.uri = uri
        self.lock_timeout_s = lock_timeout_s
        self._client = self._retry(MlflowClient, "opening the store", uri)  # a new store is created on first use

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self._retry(attribute, name, *args, **kwargs)

    def _retry(self, call, what: str, *args: Any, **kwargs: Any) -> Any:
        deadline, delay = time.monotonic() + self.lock_timeout_s, 0.25
        while True:
            try:
                with deferring_interrupts():
                    return call(*args, **kwargs)
            except Exception as error:
                if "database is locked" not in str(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreLockedError(
                        f"the MLflow store {self.uri} stayed locked by another process for over "
                        f"{self.lock_timeout_s:.0f} s (tracking.lock_timeout_s), so {what} wrote nothing. "
                        "Find the process holding it (e.g. `fuser` on the .db file), or raise the timeout"
                    ) from error
                time.sleep(delay)
                delay = min(2 * delay, 2.0)


def ensure_experiment(uri: str, experiment: str, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S) -> str:
    """The experiment's id, creating the store and the experiment (a model-training one) on first use.

    A fresh sqlite store races when several processes create its schema at once, so first use is
    serialized with a file lock beside the database. An experiment of that name in MLflow's trash cannot take
    runs: a VaelabError says how to restore or purge it.
    """
    db = _sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, may_create_folder=uri == default_uri())
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock") if db else nullcontext():
        if db is not None and not db.exists():
            copy_new_store(db)
        client = StoreClient(uri, lock_timeout_s)
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise VaelabError(in_trash(uri, experiment, found.experiment_id))
        if found is not None:
            return found.experiment_id
        return client.create_experiment(
            experiment, artifact_location=artifact_location(uri, experiment), tags=EXPERIMENT_KIND
        )


def newest_train_runs(uri: str, experiment: str, status: str | None = None, limit: int = 200) -> list[str]:
    """The ids of the experiment's training runs, most recently started first (`status`: only those that ended so,
    e.g. FINISHED). None when there is no store or no such experiment yet: looking creates neither."""
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        return []
    client = StoreClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = "tags.`vaelab.stage` = 'train'" + (f" and attributes.status = '{status}'" if status else "")
    runs = client.search_runs(
        [found.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"], max_results=limit
    )
    return [run.info.run_id for run in runs]


@contextmanager
def process_tracking_uri(uri: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking URI pointed at `uri` for the block (None: left to the block, where Lightning's
    MLflow logger sets it to its run's store), then put back as it was, with MLFLOW_TRACKING_URI, which MLflow sets
    beside it. So a sweep's or a training's store is not where a caller's later MLflow calls go."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    before_env = os.environ.get(TRACKING_URI_ENV)
    if uri is not None:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: back to unset, as MLflow's own scoped switch does
        # set_tracking_uri also writes the variable, which the caller may not have had (a URI set in code only)
        if before_env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = before_env


def copy_new_store(db: Path) -> None:
    """A new sqlite store at `db`, copied from an empty one that this MLflow made and migrated.

    MLflow makes a new store by running every schema migration since its first release, ~3 s on one core, which each
    new project (and each test, and each benchmark's fresh root) would pay again. The empty store is made once per
    MLflow, SQLAlchemy, Alembic and sqlite version, in the user's cache folder, and holds no experiment: on first
    opening a copy, MLflow adds its Default experiment there, with an artifact folder of its own. Where the cache
    cannot be written, MLflow makes the store itself, as before."""
    template = empty_store()
    if template is None:
        return
    partial = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, partial)
        os.replace(partial, db)
    except OSError:
        partial.unlink(missing_ok=True)  # MLflow makes the store instead


def empty_store() -> Path | None:
    """The cached empty, migrated store for the installed versions, made now if missing; None where it cannot be."""
    import alembic
    import mlflow
    import sqlalchemy

    versions = f"mlflow {mlflow.__version__} sqlalchemy {sqlalchemy.__version__} alembic {alembic.__version__}"
    key = hashlib.sha256(f"{versions} sqlite {sqlite3.sqlite_version}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaelab"
    template = cache / f"empty-mlflow-store-{key}.db"
    if template.is_file():
        return template
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            fresh = Path(scratch) / "mlflow.db"
            StoreClient(f"{SQLITE}{fresh}").search_experiments()  # MLflow makes and migrates it
            with closing(sqlite3.connect(fresh)) as connection, connection:
                connection.execute("DELETE FROM experiment_tags")
                connection.execute("DELETE FROM experiments")  # Default's artifact folder is the scratch folder's
            os.replace(fresh, template)  # whole or not at all, whoever else makes it at the same time
    except (OSError, sqlite3.Error):
        return None
    return template


def in_trash(uri: str, experiment: str, experiment_id: str) -> str:
    backend = "<the server's backend store URI>" if is_server(uri) else shlex.quote(uri)
    return (
        f"tracking.experiment={experiment!r}: an experiment of that name is in MLflow's trash (id {experiment_id}, "
        f"store {uri}). Restore it with `MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow experiments restore "
        f"--experiment-id {experiment_id}`, delete it for good with `mlflow gc --backend-store-uri {backend} "
        f"--experiment-ids {experiment_id}`, or choose another tracking.experiment"
    )


SERVER_SCHEMES = ("http://", "https://")
HEALTH_TIMEOUT_S = 5.0


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(SERVER_SCHEMES)


def health_request(uri: str):
    """GET <server>/health. A user and password in the URI (behind a proxy that asks for them) go as basic
    authentication, as MLflow's client sends them: urllib would take them for part of the host name."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    host += f":{parts.port}" if parts.port else ""
    url = urllib.parse.urlunsplit(parts._replace(netloc=host, path=f"{parts.path.rstrip('/')}/health"))
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        credentials = f"{user}:{urllib.parse.unquote(parts.password or '')}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(credentials).decode()}"
    return urllib.request.Request(url, headers=headers)


def check_server(uri: str | None) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer: MLflow's client would otherwise
    retry for minutes, or the run would train without being logged."""
    if not is_server(uri):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(health_request(uri), timeout=HEALTH_TIMEOUT_S) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise VaelabError(
        f"the MLflow tracking server at {redact_url(uri)} cannot be reached ({redact_url(problem)}). Start it (e.g. "
        "`mlflow server --host 127.0.0.1 --port 5000`), or leave tracking.uri unset to log to the local sqlite store."
    )
