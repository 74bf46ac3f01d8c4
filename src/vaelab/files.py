"""Writes that a crash cannot leave half-done: readers see the old content or the new, never a mix.

Every write goes through a hidden staging entry beside its target (`.<target>.<random>.staging`) that a rename puts
in place. Its writer holds an advisory lock on it while writing, so an entry nobody holds is what a killed process left:
the next write into the same folder removes it, and never one that a live process is still writing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".staging"
# Older versions named staging entries `.<target>.<8 random characters>` and moved the old folder to `.<target>.old`,
# without a lock. Those, and entries on a filesystem without locks, count as stale only after this long: no write takes
# a day, and nothing else in vaelab's folders has such a name.
UNMARKED_STAGING = re.compile(r"\..+\.([a-z0-9_]{8}|old)")
STALE_AFTER_S = 24 * 3600
# How often a publish retries when other processes keep putting their folder in place between its two renames.
SWAP_ATTEMPTS = 100

_held: dict[str, int] = {}  # this process's staging folders -> the descriptor that holds each one's lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the mode open()/mkdir() would."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _lock(fd: int) -> bool | None:
    """Take the exclusive lock on `fd` without waiting: True if taken, False if another holds it, None if the
    filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _is(fd: int, path: Path) -> bool:
    """Does `path` still name the file open as `fd`? (A rename or removal may have come between.)"""
    try:
        here, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _claimed(create) -> tuple[int, Path]:
    """A new staging entry from `create()` (-> its descriptor and path, or None), locked by this process.

    A sweep in another process may lock and remove the entry between its creation and our lock: then make another."""
    while True:
        made = create()
        if made is None:  # removed before it could be opened
            continue
        fd, path = made
        if _lock(fd) is not False and _is(fd, path):
            return fd, path
        os.close(fd)


def _age_s(path: Path) -> float:
    return time.time() - os.stat(path, follow_symlinks=False).st_mtime


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging entries in `folder` that no live process is writing (what a killed write left); the list.

    An entry's writer holds its lock until the entry is renamed into place, so one whose lock can be taken is stale.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        marked = entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIX)
        if not (marked or UNMARKED_STAGING.fullmatch(entry.name)) or entry.is_symlink():
            continue
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            taken = _lock(fd)
            if taken is False or not _is(fd, path):
                continue
            if (taken is None or not marked) and _age_s(path) < STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write beside the target, flush to disk, then rename over it: a kill at any point leaves the old file.

    A failed write (e.g. a full disk) leaves no partial file, and its OSError names `path`."""

    def create() -> tuple[int, Path]:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=STAGING_SUFFIX, dir=path.parent)
        return fd, Path(tmp)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path.parent)
        fd, tmp = _claimed(create)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        # The descriptor stays open (and the lock held) until the rename: a sweep must not take the file before it.
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        os.close(fd)
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
    """Swap folder `new` (from `staging_dir`) in for `target` by renames (both on one filesystem).

    Processes may replace the same target at once (two trainings publishing models/latest/): each moves whatever is
    there aside under a name of its own, and if another's folder lands in between, moves that aside too and tries
    again. The last one wins; none fails.
    """
    for attempt in range(SWAP_ATTEMPTS):
        aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old{STAGING_SUFFIX}")
        try:
            target.rename(aside)
        except FileNotFoundError:
            aside = None
        try:
            new.rename(target)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == SWAP_ATTEMPTS - 1:
                raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
    _release(new)


def staging_dir(target: Path) -> Path:
    """A fresh empty folder beside `target`, to fill and then `replace_dir` into place (or `discard`).

    Until then this process holds its lock, so no sweep removes it; what killed processes left beside `target` goes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)

    def create() -> tuple[int, Path] | None:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGING_SUFFIX, dir=target.parent))
        try:
            return os.open(folder, os.O_RDONLY), folder
        except FileNotFoundError:
            return None

    fd, folder = _claimed(create)
    _held[str(folder)] = fd
    _usual_mode(folder, is_dir=True)
    return folder


def _release(folder: Path) -> None:
    fd = _held.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


def discard(folder: Path) -> None:
    """Remove a staging folder that will not be put in place."""
    shutil.rmtree(folder, ignore_errors=True)
    _release(folder)


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block succeeds it replaces `target` whole, else it is removed."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        discard(staging)  # after the swap there is nothing left to remove
