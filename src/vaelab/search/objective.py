"""The Optuna objective: one trial, trained and scored.

A trial is `python pipelines/train.py <overrides>` in all but name: its config is conf/train.yaml composed with
the command line's overrides plus the trial's sampled ones (Hydra's compose API), and `training.train` trains it
as a nested MLflow run under the search's parent run. The search adds two Lightning callbacks and nothing else:
Optuna's pruning callback, which reports the metric every epoch and raises `TrialPruned`, and one that links the
trial and its MLflow run both ways. `train` ends a pruned trial's run KILLED with the tag `optuna.state=PRUNED`
(MLflow has no PRUNED status) and a failed one FAILED.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vaelab.redaction import redact_override, redact_text
from vaelab.schema import END_OF_TRAINING_METRICS
from vaelab.search.config import Settings, compose_config
from vaelab.search.space import Param
from vaelab.search.study import RETRY_ATTR
from vaelab.tracking.lifecycle import INTERRUPTED, end_run
from vaelab.tracking.run import Run, overrides_tag, redacted

if TYPE_CHECKING:
    import optuna

SUMMARY_ATTRS = ("val/elbo", "val/rec", "val/kl", "val/bpd", "val/nll_iw", "best_epoch", "epochs")


class NonFiniteObjectiveError(RuntimeError):
    """A trial trained without error but its objective is NaN or infinite: the trial counts as failed."""


def trial_callbacks(trial: optuna.Trial, metric: str, tags: dict[str, str]) -> list:
    """Optuna's pruning callback (reports `metric` after each validation epoch, raises TrialPruned when the pruner
    says so; not for a metric estimated only after training), and one that links the trial and its MLflow run as
    soon as the run exists: the run gets `tags`, the trial the user attribute `mlflow_run_id`, even when the trial
    later fails or is pruned."""
    from lightning.pytorch.callbacks import Callback
    from optuna_integration import PyTorchLightningPruningCallback

    class LinkRun(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            logger = trainer.logger
            run_id = getattr(logger, "run_id", None)
            if not trainer.is_global_zero or run_id is None:
                return
            trial.set_user_attr("mlflow_run_id", run_id)
            for key, value in tags.items():
                logger.experiment.set_tag(run_id, key, value)

    pruning = [] if metric in END_OF_TRAINING_METRICS else [PyTorchLightningPruningCallback(trial, monitor=metric)]
    return [*pruning, LinkRun()]


@dataclass
class Objective:
    """Train one trial and return its validation metric (raising makes the trial FAIL, TrialPruned PRUNED)."""

    config_dir: Path | None  # None inside a Hydra application, which composes with its own search path
    config_name: str
    train_overrides: list[str]
    params: list[Param]
    settings: Settings
    parent_run_id: str | None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from vaelab.stages.train import train

        overrides = [*self.train_overrides, *(param.suggest(trial) for param in self.params)]
        # What the study stores (and trials.csv, the best config and reproduce.sh are made from): no secrets.
        trial.set_user_attr("overrides", [redact_override(o) for o in overrides])
        tags = redacted(
            {
                "optuna.study_name": self.settings.study_name,
                "optuna.trial_number": str(trial.number),
                "vaelab.overrides": overrides_tag(overrides),
            }
        )
        if trial.user_attrs.get(RETRY_ATTR) is not None:
            tags["optuna.retry_of"] = str(trial.user_attrs[RETRY_ATTR])
        try:
            cfg = compose_config(self.config_dir, overrides, config_name=self.config_name)
            if cfg.tracking.run_name is None:  # a readable name in the MLflow UI; the config is otherwise train.py's
                cfg.tracking.run_name = f"{self.settings.study_name}/trial-{trial.number}"
            summary = train(
                cfg,
                callbacks=trial_callbacks(trial, self.settings.metric, tags),
                parent_run_id=self.parent_run_id,
                pruned=(optuna.TrialPruned,),
            )
        except optuna.TrialPruned:
            raise
        except (KeyboardInterrupt, SystemExit) as error:
            # Lightning turns Ctrl-C into a graceful stop and SystemExit, which Optuna would leave RUNNING; as a
            # KeyboardInterrupt the trial is recorded FAIL and the interrupt stops the search.
            trial.set_user_attr("failure", INTERRUPTED)
            raise KeyboardInterrupt from error
        except Exception as error:
            trial.set_user_attr("failure", redact_text(f"{type(error).__name__}: {error}")[:2000])
            raise
        trial.set_user_attr("mlflow_run_id", summary["run_id"])
        for key in SUMMARY_ATTRS:
            if key in summary:
                trial.set_user_attr(key, float(summary[key]))
        value = float(summary[self.settings.metric])
        if not math.isfinite(value):
            # Training finished, but a NaN or infinite objective ranks nowhere: the trial FAILs, and so does its run.
            reason = f"non-finite {self.settings.metric} ({value})"
            trial.set_user_attr("failure", reason)
            error = NonFiniteObjectiveError(reason)
            end_run(Run.attach(cfg.tracking.uri, summary["run_id"]), error)
            raise error
        return value
