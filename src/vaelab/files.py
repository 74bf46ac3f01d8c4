"""Writes that a crash cannot leave half-done: readers see the old content or the new, never a mix."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the mode open()/mkdir() would."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write beside the target, flush to disk, then rename over it: a kill at any point leaves the old file.

    A failed write (e.g. a full disk) leaves no partial file, and its OSError names `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    return path


def check_writable(folder: Path) -> None:
    """Raise the OSError (naming `folder`) that writing there would meet, before any work depends on it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(folder)) from error


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir(new: Path, target: Path) -> None:
    """Swap folder `new` in for `target` by renames (both on one filesystem)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A fresh empty folder beside `target`, to fill and then `replace_dir` into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _usual_mode(folder, is_dir=True)
    return folder


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block succeeds it replaces `target` whole, else it is removed."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
