"""User-facing errors: a bad config or bad data, reported as a plain message without a traceback, and without the
secrets it may quote (vaelab.redaction)."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from vaelab.redaction import redact_config, redact_text


class VaelabError(Exception):
    """An error the user can fix; entry points print it plainly and exit non-zero."""


class ConfigError(VaelabError):
    """One or more config values are invalid. Each problem names the key, the value and what is allowed."""

    def __init__(self, problems: list[tuple[str, object, str]]):
        self.problems = [redact_problem(*problem) for problem in problems]
        lines = [f"  {key}={value!r}: allowed {allowed}" for key, value, allowed in self.problems]
        super().__init__("invalid config:\n" + "\n".join(lines))


def redact_problem(key: str, value: object, allowed: str) -> tuple[str, object, str]:
    """A problem as it may be shown: a secret key's value, and any URL's password, as `***` (vaelab.redaction)."""
    return key, redact_config({key: value})[key], redact_text(allowed)


class DataError(VaelabError):
    """The dataset is missing, truncated or corrupted."""


class CheckpointError(VaelabError):
    """A checkpoint is missing, unreadable, unsafe to load, or not the model the config or data asks for."""


class StoreLockedError(VaelabError):
    """The MLflow store stayed locked by another process for longer than tracking.lock_timeout_s."""


class StorageError(VaelabError):
    """Something could not be written: the disk is full, or a folder is read-only or not a folder."""


# OSErrors that mean "the storage refused", not "vaelab has a bug": reported as a message naming the path.
STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than allowed",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way of a folder",
}


def storage_problem(error: BaseException) -> StorageError | None:
    """A StorageError naming the path, when `error` is a storage refusal (disk full, read-only, ...); else None."""
    if not isinstance(error, OSError) or error.errno not in STORAGE_ERRNOS:
        return None
    where = error.filename if error.filename is not None else "an output file"
    return StorageError(f"cannot write {os.fsdecode(where)}: {STORAGE_ERRNOS[error.errno]} ({error.strerror})")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving its state; the message says where and how to resume.

    A KeyboardInterrupt, so whatever runs the training (a sweep, a search) stops too instead of going on."""


class EvaluationInterrupted(KeyboardInterrupt):
    """Evaluation stopped on Ctrl-C or SIGTERM; the message says what was left as it was and how to go on."""


INTERRUPTED_EXIT = 130  # the shell's convention for a process ended by SIGINT


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A VaelabError or a storage refusal becomes a one-paragraph message on stderr and exit status 2; Ctrl-C a
    message and 130."""
    try:
        yield
    except VaelabError as error:
        print(f"vaelab: {redact_text(str(error))}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        problem = storage_problem(error)
        if problem is None:
            raise
        print(f"vaelab: {redact_text(str(problem))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:
        print(f"vaelab: {redact_text(str(error) or 'interrupted')}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
