"""User-facing errors: a bad config or bad data, reported as a plain message without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class VaelabError(Exception):
    """An error the user can fix; entry points print it plainly and exit non-zero."""


class ConfigError(VaelabError):
    """One or more config values are invalid. Each problem names the key, the value and what is allowed."""

    def __init__(self, problems: list[tuple[str, object, str]]):
        self.problems = problems
        lines = [f"  {key}={value!r}: allowed {allowed}" for key, value, allowed in problems]
        super().__init__("invalid config:\n" + "\n".join(lines))


class DataError(VaelabError):
    """The dataset is missing, truncated or corrupted."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a VaelabError into a one-paragraph message on stderr and exit status 2."""
    try:
        yield
    except VaelabError as error:
        print(f"vaelab: {error}", file=sys.stderr)
        sys.exit(2)
