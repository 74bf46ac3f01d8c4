"""Secrets never leave the process in plain text: the one rule that finds them, and how vaelab writes them instead.

The rule:
- A key is secret when its dotted name holds, in any case and with `_` and `-` ignored, one of the words in
  SECRET_WORDS: `db.password`, `tracking.api_token`, `my_secret_key`, `callbacks.notify.API-Key`. Its value is
  written as `***`.
- The password of a URL is secret, whatever the key: `postgresql+psycopg://user:pw@host/db` is written as
  `postgresql+psycopg://user:***@host/db`, in a value and in any text (an override, a command line, an error
  message). The user name, host and path stay.
- A value read from the environment (`${oc.env:VAR}`, directly or through other keys) is written as that
  interpolation, never as the variable's value, whatever the key; so is any interpolation that a secret key holds.
  A config read back (resume=) then reads the variable again.

Everything vaelab writes goes through here: `redact_config` for a config (outputs/<run_id>/config.yaml and its
copies, a checkpoint's lineage, MLflow params, a search's best config, Hydra's multirun.yaml), `redact_override` for
one command-line override, and `redact_text` for any other text (tags, failure reasons, error messages, trial
attributes). A secret given in plain text is therefore stored nowhere: resuming such a run asks for it again.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey", "privatekey")
REDACTED = "***"

_IGNORED_IN_KEYS = re.compile(r"[_-]")
# RFC 3986: a URL's user information cannot hold `/ ? # @` unescaped, so the password ends at the first of them.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*):(?P<password>[^/?#@\s]*)@")
# A key and its value in text: `key=value` (an override, a query string), `"key": "value"` (JSON, a Python dict's
# repr) and `{key: value, ...}` (Hydra's and YAML's inline dicts). The value ends at a separator or a closing quote.
_VALUE = r"(?P<value>\$\{[^}]*\}|'[^']*'|\"[^\"]*\"|[^\s,;&'\"\])}{]+)"
_ASSIGNMENT = re.compile(
    rf"(?P<key>[\w.+~/-]+)(?P<sep>=){_VALUE}"
    rf"|(?P<qkey>['\"][\w.+~/-]+['\"])(?P<qsep>\s*:\s*){_VALUE.replace('value', 'qvalue')}"
    rf"|(?<=[{{,])(?P<ikey>\s*[\w.+~/-]+)(?P<isep>\s*:\s*){_VALUE.replace('value', 'ivalue')}"
)
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def is_secret_key(key: str) -> bool:
    """`db.password`, `+tracking.api_token`, `my_secret_key`, `API-Key`: yes. `model.latent_dim`: no."""
    folded = _IGNORED_IN_KEYS.sub("", key.lower())
    return any(word in folded for word in SECRET_WORDS)


def is_interpolation(value: object) -> bool:
    return isinstance(value, str) and "${" in value


def is_redacted(value: object) -> bool:
    """Does `value` hold a secret that was not stored (a config read back from a file vaelab wrote)?"""
    return isinstance(value, str) and REDACTED in value


def redact_url(text: str) -> str:
    """Every URL's password in `text` as `***`."""
    return _URL_PASSWORD.sub(lambda found: f"{found['head']}:{REDACTED}@", text)


def redact_text(text: str) -> str:
    """`text` with every URL's password, and the value of every `secret_key=value`, as `***`."""

    return _redact_assignments(redact_url(text))


def _redact_assignments(text: str) -> str:
    def assignment(found: re.Match) -> str:
        form = next(form for form in ("", "q", "i") if found[f"{form}key"] is not None)
        key, sep, value = found.group(f"{form}key", f"{form}sep", f"{form}value")
        if is_interpolation(value):
            return found[0]
        if not is_secret_key(key):  # its value may hold assignments of its own: `uri=https://h/?token=abc`
            return f"{key}{sep}{_redact_assignments(value)}"
        quote = value[0] if value[:1] in ("'", '"') else ""
        return f"{key}{sep}{quote}{REDACTED}{quote}"

    return _ASSIGNMENT.sub(assignment, text)


def redact_override(override: str) -> str:
    """One Hydra override: `db.password=hunter2` -> `db.password=***` (an interpolation stays); in any other, what
    `redact_text` finds (`+callbacks.x={url:'http://u:pw@h',api_token:abc}` -> `...u:***@h',api_token:***}`)."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key) and value and not is_interpolation(value):
        return f"{key}{sep}{REDACTED}"
    return redact_text(override)


def redact_config(raw: Any, resolved: Any = None) -> Any:
    """A config (plain dicts and lists, as OmegaConf.to_container makes them) as vaelab may write it.

    `raw` has its interpolations unresolved; `resolved` is the same config resolved, or None to keep every
    interpolation as written. A secret key's value becomes `***`, a value from the environment (or a secret key's
    interpolation) stays an interpolation, and every other string loses its URL passwords."""
    flat_raw = _flatten(raw)

    def from_environment(key: str, seen: frozenset[str] = frozenset()) -> bool:
        for reference in _INTERPOLATION.findall(flat_raw.get(key, "")):
            if reference.startswith("oc.env"):
                return True
            if reference not in seen and reference in flat_raw and from_environment(reference, seen | {key}):
                return True
        return False

    def leaf(key: str, raw_value: Any, value: Any) -> Any:
        if is_interpolation(raw_value) and (resolved is None or is_secret_key(key) or from_environment(key)):
            return redact_text(raw_value)  # the interpolation stays; what else the text holds may be secret
        if is_secret_key(key) and value not in (None, "") and not isinstance(value, bool):
            return REDACTED
        return redact_text(value) if isinstance(value, str) else value

    def walk(raw_node: Any, node: Any, prefix: str) -> Any:
        if isinstance(raw_node, dict):
            return {k: walk(v, _child(node, k), f"{prefix}{k}.") for k, v in raw_node.items()}
        if isinstance(raw_node, list):
            return [walk(v, _child(node, i), f"{prefix}{i}.") for i, v in enumerate(raw_node)]
        return leaf(prefix[:-1], raw_node, node)

    return walk(raw, raw if resolved is None else resolved, "")


def plain_secrets(raw: Any) -> list[str]:
    """The keys of an unresolved config that hold a secret in plain text (not as an interpolation)."""
    literal = {key: value for key, value in _flatten(raw).items() if value not in ("None", "") and "${" not in value}
    return [key for key, value in literal.items() if is_secret_key(key) or redact_url(value) != value]


def _child(node: Any, key: Any) -> Any:
    try:
        return node[key]
    except (KeyError, IndexError, TypeError):
        return None


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': [1]}} -> {'a.b.0': '1'}: every leaf under its dotted key, as text."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix[:-1]: str(node)}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
