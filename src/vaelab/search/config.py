"""What a search is asked to do: the multirun's command line, split into the space's parameters and the training
overrides every trial gets; conf/train.yaml composed with them, as the entry points compose it; and the validated
`hydra.sweeper.*` keys (Settings)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.config import hydra_errors
from vaelab.errors import VaelabError
from vaelab.schema import SWEEPER

SPACE_GROUP = "hparams_search"  # conf/hparams_search/<name>.yaml: a search space and its study's settings
NOT_SEARCHABLE_GROUPS = ("hparams_search", "sweep", "hydra")  # config groups a trial cannot choose
PRIMARY_CONFIG = "train"


class OverrideError(VaelabError):
    """The command line is not a list of valid Hydra overrides for conf/train.yaml."""


def compose_config(
    config_dir: Path | None, overrides: Sequence[str], hydra: bool = False, config_name: str = PRIMARY_CONFIG
) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as the entry points compose it. Inside a Hydra application (a
    search's sweeper, or one of its workers) with the application's own config search path; `config_dir` otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        # hydra_errors: an unknown option or key is one line naming it, as in the other entry points
        with hydra_errors():
            if GlobalHydra.instance().is_initialized():
                return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
    except HydraException as error:
        message = str(error).split("\nConfig search path")[0].strip()  # Hydra's search path is noise here
        raise OverrideError(f"invalid override: {message}") from None


def config_groups(config_dir: Path | None = None) -> dict[str, list[str]]:
    """The config groups a trial may choose between, and their options: {'arch': ['conv', 'mlp', 'resnet'], ...}.
    Inside a Hydra application its config loader knows every group, whichever folder or plugin provides it;
    outside one, those of `config_dir`."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return config_groups()
    loader = GlobalHydra.instance().config_loader()
    groups = (name for name in loader.list_groups("") if name not in NOT_SEARCHABLE_GROUPS)
    return {name: options for name in sorted(groups) if (options := sorted(loader.get_group_options(name)))}


# The validated hydra.sweeper.* keys


@dataclass(frozen=True)
class Settings:
    """The `hydra.sweeper.*` keys, once vaelab.config.search_problems has found nothing wrong with them."""

    name: str  # the search space's file in conf/hparams_search/, or "command line"
    study_name: str
    storage: str  # an SQLAlchemy URL
    n_trials: int
    n_jobs: int | None
    metric: str
    direction: str
    sampler: dict[str, Any]  # {_target_: an Optuna sampler class, its arguments}
    pruner: dict[str, Any]  # {_target_: an Optuna pruner class, its arguments}
    space: dict[str, str]  # {config key: its distribution, as written}
    # A running trial records a heartbeat; one silent for the grace period (its process died) is marked FAIL and
    # retried, so a crashed worker's trial neither blocks the study nor is waited for forever.
    heartbeat_interval: int  # seconds between a running trial's heartbeats
    grace_period: int  # seconds of silence after which a trial's worker counts as dead
    max_retry: int  # retries of a dead worker's trial

    @classmethod
    def from_config(cls, sweeper: DictConfig, name: str, space: dict[str, str]) -> Settings:
        values = OmegaConf.to_container(sweeper, resolve=True)  # as vaelab.schema.OptunaSweeper checked it
        return cls(
            name=name,
            study_name=values["study_name"],
            storage=values["storage"] or default_storage(),
            n_trials=values["n_trials"],
            n_jobs=values["n_jobs"],
            metric=values["metric"],
            direction=values["direction"],
            sampler=values["sampler"],
            pruner=values["pruner"],
            space=space,
            heartbeat_interval=values["heartbeat_interval"],
            grace_period=values["grace_period"],
            max_retry=values["max_retry"],
        )

    @property
    def pruner_name(self) -> str:
        return str(self.pruner["_target_"]).rpartition(".")[2]

    @property
    def sampler_name(self) -> str:
        return str(self.sampler["_target_"]).rpartition(".")[2]


def default_storage() -> str:
    return f"sqlite:///{paths.store_root() / 'optuna.db'}"


def key(name: str) -> str:
    """A sweeper key's full name, as messages give it: key('n_trials') -> 'hydra.sweeper.n_trials'."""
    return f"{SWEEPER}.{name}"
