"""The keys that only Lightning and torch can judge, judged by building what they configure, before any run exists.

The schema checks types and ranges; whether `trainer.devices=0` suits the accelerator, `trainer.precision` is one
Lightning knows, `trainer.accelerator=gpu` has a GPU, or `optim._target_` names an optimizer, only the Trainer's and
the optimizer's own constructors know. train() builds them here first, with throwaway arguments, so such a value
fails in a second as a ConfigError naming its key, instead of after the MLflow run was created.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import ConfigError
from vaelab.training.builder import UntrustedTarget, build, build_optimizer, resolve


def check_buildable(cfg: DictConfig) -> None:
    """Raise ConfigError when Lightning refuses the `trainer` keys, or torch the `optim` and `scheduler` keys."""
    check_trainer(cfg.trainer)
    check_optimizer(cfg.optim, cfg.get("scheduler"))


def check_trainer(trainer: DictConfig) -> None:
    # Without logger, checkpoints or progress bar: only the arguments that the config sets are being judged.
    arguments = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    try:
        with lightning_quiet():
            instantiate(trainer, **arguments)
    except InstantiationException as error:  # Hydra's wrapping of what the constructor raised
        raise ConfigError([refused(trainer, "trainer", error.__cause__ or error)]) from None
    except Exception as error:  # Lightning's MisconfigurationException, ValueError, TypeError: all about arguments
        raise ConfigError([refused(trainer, "trainer", error)]) from None


def check_optimizer(optim: DictConfig, scheduler: DictConfig | None) -> None:
    spec = OmegaConf.to_container(optim, resolve=True)
    target = spec["_target_"]
    try:
        found = resolve(target)
    except UntrustedTarget as error:
        raise ConfigError([("optim._target_", target, f"a torch.optim optimizer class ({error})")]) from None
    if not (inspect.isclass(found) and issubclass(found, torch.optim.Optimizer)):
        raise ConfigError([("optim._target_", target, "a torch.optim optimizer class")])
    try:
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], spec)
    except (TypeError, ValueError) as error:
        raise ConfigError([refused(optim, "optim", error)]) from None
    if scheduler is not None:
        try:
            build(OmegaConf.to_container(scheduler, resolve=True), optimizer=optimizer)
        except (UntrustedTarget, TypeError, ValueError) as error:
            raise ConfigError([refused(scheduler, "scheduler", error)]) from None


def refused(section: DictConfig, prefix: str, error: BaseException) -> tuple[str, Any, str]:
    """(key, value, allowed) for an error that a constructor raised about one of `section`'s keys: the key that its
    message names (Lightning's and torch's messages name the argument), else the whole section."""
    message = " ".join(str(error).split())
    allowed = f"what {section.get('_target_', prefix)} accepts: {message}"
    keys = [key for key in section if key != "_target_"]

    def mentions(text: object, pattern: str = r"\b{}\b", flags: int = 0) -> bool:
        return isinstance(text, str) and bool(re.search(pattern.format(re.escape(text)), message, flags))

    named = [
        *(key for key in keys if mentions(key, r"`{0}`|\b{0}=")),  # `devices` ..., Trainer(devices=0)
        *(key for key in keys if mentions(key, flags=re.IGNORECASE)),  # Precision 'bogus' is invalid
        *(key for key in keys if mentions(section[key])),  # No supported gpu backend found! (accelerator=gpu)
    ]
    if named:
        return f"{prefix}.{named[0]}", section[named[0]], allowed
    return prefix, "<its keys>", allowed


@contextmanager
def lightning_quiet() -> Iterator[None]:
    """Lightning announces the devices it found at every Trainer it builds; the real Trainer will say it once."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
