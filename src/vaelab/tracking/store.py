"""The MLflow store: where it is (a sqlite file at the store root by default, or a server), a client that waits out
a locked sqlite database, and the experiment, created on first use."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock

from vaelab import paths
from vaelab.errors import StoreLockedError, VaelabError
from vaelab.redaction import redact_url

STORE_LOCK_TIMEOUT_S = 30.0  # default of tracking.lock_timeout_s


def default_uri() -> str:
    return f"sqlite:///{paths.store_root() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or default_uri()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """An absolute artifact folder beside a sqlite store (MLflow defaults to ./mlruns); a server picks its own."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts" / experiment).as_uri() if db else None


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
    """The experiment's id, creating the store and the experiment on first use.

    A fresh sqlite store races when several processes create its schema at once, so first use is
    serialized with a file lock beside the database.
    """
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock") if db else nullcontext():
        client = StoreClient(uri, lock_timeout_s)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))



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
