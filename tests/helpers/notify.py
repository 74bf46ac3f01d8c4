"""A Lightning callback that holds secrets, as a chat or monitoring notifier would: a config adds it like any other
(`+callbacks.notify={_target_:helpers.notify.Notifier,...}`, with tests/ on PYTHONPATH), which puts secret-named
keys (`api_token`, `my_secret_key`, `db.password`) and a URL with a password into a config that validates.

It sends nothing. It refuses a value that vaelab redacted or left unresolved: a run must be given the real secrets
(a resumed one too), even though none of them is stored."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class Notifier(Callback):
    def __init__(self, api_token: str, my_secret_key: str = "", webhook: str = "", db: dict | None = None):
        values = {"api_token": api_token, "my_secret_key": my_secret_key, "webhook": webhook, **(db or {})}
        for name, value in values.items():
            if "***" in str(value) or "${" in str(value):
                raise ValueError(f"Notifier was given {name} without its secret")
        self.values = values
