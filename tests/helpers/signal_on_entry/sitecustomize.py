"""Sends this process a real signal as a named function is entered: how the fault tests stop a run at an exact phase
(the end-of-training estimates, the figures, model logging, evaluation, a sweep between jobs, a run's cleanup)
instead of guessing it with a timer.

A test puts this folder first on the PYTHONPATH of the process it starts, with VAELAB_TEST_SIGNALS set to a JSON
list of {"at": "module:function" or "module:Class.method", "call": n, "signal": "SIGTERM", "delay": s}. The signal
goes out on the n-th call (1 if left out) of that function, just before its body runs, or `delay` seconds after that
call began (from a timer thread, so in the middle of the call); the time it was sent goes to stderr. Only the entry
is patched: what the process does with the signal is its own code's doing. Python imports this module at start-up
(site's `sitecustomize` hook); it patches each target right after its module is first imported, before anything can
have imported the function by name.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import threading
import time

PLAN = json.loads(os.environ.get("VAELAB_TEST_SIGNALS", "[]"))
TARGETS: dict[str, list[dict]] = {}
for entry in PLAN:
    module_name, _, attribute = entry["at"].partition(":")
    TARGETS.setdefault(module_name, []).append({**entry, "attribute": attribute})


def send(entry: dict, calls: int) -> None:
    print(
        f"signal_on_entry: {entry['signal']} at {entry['at']} (call {calls}) at {time.time():.3f}",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), getattr(signal, entry["signal"]))


def signalling(function, entry: dict):
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == entry.get("call", 1):
            if entry.get("delay"):
                threading.Timer(entry["delay"], send, [entry, calls]).start()
            else:
                send(entry, calls)
        return function(*args, **kwargs)

    return wrapper


def patch(module) -> None:
    for entry in TARGETS.get(module.__name__, []):
        owner_path, _, name = entry["attribute"].rpartition(".")
        owner = module
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)
        setattr(owner, name, signalling(getattr(owner, name), entry))


class PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if TARGETS:
    sys.meta_path.insert(0, PatchAfterImport())
