"""`hydra/sweeper=optuna`: a hyperparameter search as a Hydra multirun, driven by vaelab's Optuna study machinery.

    python pipelines/train.py -m hparams_search=default data=digits hydra.sweeper.n_trials=40
    python pipelines/train.py -m hparams_search=default hydra/launcher=joblib hydra.launcher.n_jobs=2

The search space is `hydra.sweeper.params` in Hydra's sweeper syntax (conf/hparams_search/), plus any sweep override
on the command line (`'objective.beta=tag(log,interval(0.5,4))'`); every other override is a fixed setting of the
study. What a search does (a persistent study, exact n_trials, pruning, several workers, dead-worker retries, one
MLflow parent run with a nested run per trial, the report) is vaelab.search.driver's; this module is the door
Hydra users know. Hydra only instantiates sweepers from its `hydra_plugins` namespace package, hence this package.

The sampler and the pruner are `_target_` configs of Optuna's classes, chosen as config groups
(`hydra/sweeper/sampler=random`, `hydra/sweeper/pruner=hyperband`) and overridable key by key
(`hydra.sweeper.sampler.seed=0`, `hydra.sweeper.pruner.n_warmup_steps=2`).
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Plain `Any`: vaelab checks every key itself and names it in one line (exit status 2), as for any other config key.


@dataclass
class OptunaSweeperConf:
    defaults: list = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    _target_: str = "hydra_plugins.vaelab_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built (and checked) by the search, not by Hydra
    study_name: Any = "default"  # the study's name in the storage: rerunning the command resumes it
    storage: Any = None  # null = sqlite:///<project>/optuna.db; or any SQLAlchemy URL
    n_trials: Any = 20  # the study's TOTAL finished trials (COMPLETE, PRUNED or FAIL): a rerun runs the rest
    n_jobs: Any = None  # workers sharing the study; null = the launcher's n_jobs (joblib), else 1
    metric: Any = "val/elbo"  # validation only: test numbers never choose a model
    direction: Any = "maximize"
    heartbeat_interval: Any = 30  # s between a running trial's heartbeats in the storage
    grace_period: Any = 180  # s without one after which a trial's worker counts as dead (FAIL, retried)
    max_retry: Any = 2  # retries of a dead worker's trial (a new trial, same parameters, not in n_trials)
    sampler: Any = None  # from hydra/sweeper/sampler
    pruner: Any = None  # from hydra/sweeper/pruner
    # the search space: {config key: interval(...) | choice(...) | ...}; a mapping, so that keys can be added to it
    params: dict = field(default_factory=dict)


SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
}
# Steps are epochs, from 0. Hyperband's max_resource null means trainer.max_epochs.
PRUNERS = {
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
        "interval_steps": 1,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": None,
        "reduction_factor": 3,
    },
    "none": {"_target_": "optuna.pruners.NopPruner"},
}

store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="vaelab")
for name, node in SAMPLERS.items():
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="vaelab")
for name, node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="vaelab")


class OptunaSweeper(Sweeper):
    """Hydra's side of a search: it hands the composed multirun config, the command line and the launcher to
    vaelab.search.driver. With Hydra's basic launcher the trials run one at a time in this process; with another
    (joblib, slurm) the launcher starts n_jobs workers, each of which runs trials until the study has n_trials."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # checked by the driver, with the rest of the config

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        from vaelab.search.driver import sweep

        return sweep(self.config, arguments, self.hydra_context)
