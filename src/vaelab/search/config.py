"""What a search is asked to do: its command line, split into the training overrides that every trial gets and the
search's own keys (search=<name>, search.*); conf/train.yaml composed with them, as the entry points compose it;
and the validated `search.*` keys (Settings)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.config import check_command_line, hydra_errors
from vaelab.errors import VaelabError

SEARCH_GROUP = "search"
DEFAULT_SEARCH = "default"
NOT_SEARCHABLE_GROUPS = ("search", "sweep")  # config groups a trial cannot choose


class OverrideError(VaelabError):
    """The command line is not a list of valid Hydra overrides for conf/train.yaml."""


# The command line


@dataclass(frozen=True)
class CommandLine:
    """The search's command line, split: its own keys (search=<name>, search.*) and the training overrides,
    which every trial gets before its sampled ones."""

    train: list[str]
    search: list[str]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> CommandLine:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        try:
            parsed = OverridesParser.create().parse_overrides(list(argv))
        except HydraException as error:
            raise OverrideError(f"cannot parse the command line as Hydra overrides: {error}") from None
        check_command_line(list(argv))
        train, search = [], []
        for override, text in zip(parsed, argv, strict=True):
            if override.is_sweep_override():
                raise OverrideError(f"{text}: a search takes single values (sweeps are `pipelines/train.py -m`)")
            key = override.key_or_group
            (search if key == SEARCH_GROUP or key.startswith(f"{SEARCH_GROUP}.") else train).append(text)
        if not any(re.match(rf"\+*{SEARCH_GROUP}=", text) for text in search):
            search.insert(0, f"{SEARCH_GROUP}={DEFAULT_SEARCH}")
        return cls(train=train, search=search)


def compose_config(config_dir: Path, overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as the entry points compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        # hydra_errors: an unknown option or key is one line naming it, as in the other entry points
        with hydra_errors(), initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
    except HydraException as error:
        message = str(error).split("\nConfig search path")[0].strip()  # Hydra's search path is noise here
        raise OverrideError(f"invalid override: {message}") from None


def config_groups(config_dir: Path) -> dict[str, list[str]]:
    """The config groups a trial may choose between, and their options: {'arch': ['conv', 'mlp', 'resnet'], ...}."""
    return {
        folder.name: sorted(file.stem for file in folder.glob("*.yaml"))
        for folder in sorted(config_dir.iterdir())
        if folder.is_dir() and folder.name not in NOT_SEARCHABLE_GROUPS and any(folder.glob("*.yaml"))
    }


# The validated search.* keys


@dataclass(frozen=True)
class Settings:
    """The `search.*` keys, once vaelab.config.search_problems has found nothing wrong with them."""

    name: str  # the search space's file in conf/search/
    study_name: str
    storage: str  # an SQLAlchemy URL
    n_trials: int
    metric: str
    direction: str
    sampler: str
    seed: int | None
    pruner: str
    pruner_options: dict[str, Any]
    space: dict[str, Any]
    # A running trial records a heartbeat; one silent for the grace period (its process died) is marked FAIL and
    # retried, so a crashed worker's trial neither blocks the study nor is waited for forever.
    heartbeat_interval: int  # seconds between a running trial's heartbeats
    grace_period: int  # seconds of silence after which a trial's worker counts as dead
    max_retry: int  # retries of a dead worker's trial

    @classmethod
    def from_config(cls, search: DictConfig, name: str) -> Settings:
        settings = cls(  # search.* as vaelab.schema.Search checked it
            name=name,
            study_name=search.study_name,
            storage=search.storage or default_storage(),
            n_trials=search.n_trials,
            metric=search.metric,
            direction=search.direction,
            sampler=search.sampler,
            seed=search.seed,
            pruner=search.pruner,
            pruner_options=OmegaConf.to_container(search.get("pruner_options") or {}, resolve=True),
            space=OmegaConf.to_container(search.space, resolve=True),
            heartbeat_interval=search.heartbeat_interval,
            grace_period=search.grace_period,
            max_retry=search.max_retry,
        )
        return settings


def default_storage() -> str:
    return f"sqlite:///{paths.store_root() / 'optuna.db'}"
