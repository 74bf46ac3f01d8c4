"""Resuming a killed or stopped run: `python pipelines/train.py resume=<run_id>` (or `resume=last`).

A resumed run is the same run, continued: it trains with the config it was started with (its
outputs/<run_id>/config.yaml), from its last checkpoint (weights, optimizer, scheduler, epoch, callbacks and
RNG state), on the same data (the data hash must match), and logs into the same MLflow run without logging
its params again (MLflow refuses changed param values). Its config file holds no secret (vaelab.redaction): one
given as `${oc.env:VAR}` is read from the environment again; a tracking.uri's password is given again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vaelab import __version__, paths
from vaelab.errors import ConfigError, VaelabError
from vaelab.redaction import is_redacted
from vaelab.tracking.run import flatten
from vaelab.tracking.store import ensure_experiment, resolve_uri

# Overrides that may come with resume=: where to find the run. Anything else would change a run in flight.
ALLOWED_WITH_RESUME = ("resume", "tracking.uri", "tracking.experiment")


@dataclass
class Resumption:
    run_id: str
    checkpoint: Path
    cfg: DictConfig  # the run's own config


def last_checkpoint(run_id: str) -> Path:
    return paths.last_checkpoint(run_id)


def newest_resumable(uri: str, experiment: str) -> str:
    """The most recently started train run of the experiment that has a last checkpoint here."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(uri, experiment)
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.`vaelab.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    for run in runs:
        if last_checkpoint(run.info.run_id).is_file():
            return run.info.run_id
    raise VaelabError(
        f"resume=last: no train run of experiment '{experiment}' in {uri} has a last checkpoint "
        f"(outputs/<run_id>/checkpoints/last.ckpt under {paths.project_root()})"
    )


def resumption(cfg: DictConfig, overrides: list[str]) -> Resumption:
    """Which run `cfg.resume` names, its last checkpoint and its own config; a clear error when any is missing."""
    extra = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ALLOWED_WITH_RESUME]
    if extra:
        raise ConfigError(
            [
                (
                    "resume",
                    cfg.resume,
                    f"no other overrides ({' '.join(extra)}): a resumed run continues with its own config; "
                    f"only {', '.join(ALLOWED_WITH_RESUME[1:])} may say where to find it",
                )
            ]
        )
    if cfg.resume == "last":
        run_id = newest_resumable(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)
    else:
        run_id = cfg.resume  # a run id: vaelab.schema checked its form

    checkpoint, config_file = last_checkpoint(run_id), paths.run_config(run_id)
    for path in (checkpoint, config_file):
        if not path.is_file():
            raise VaelabError(f"cannot resume run {run_id}: {path} does not exist")
    stored = OmegaConf.load(config_file)
    if "objective" not in stored:
        raise VaelabError(
            f"cannot resume run {run_id}: {config_file} was written by vaelab 0.1, whose runs vaelab {__version__} "
            "cannot continue (the objective, posterior and prior became components); start a new run"
        )
    stored.resume = run_id
    if any(o.startswith("tracking.uri=") for o in overrides):
        stored.tracking.uri = cfg.tracking.uri  # the store moved, e.g. to a server: this command says where
    check_secrets_at_hand(run_id, stored)
    return Resumption(run_id=run_id, checkpoint=checkpoint, cfg=stored)


def check_secrets_at_hand(run_id: str, stored: DictConfig) -> None:
    """A secret given as `${oc.env:VAR}` was stored as such: VAR must be set again. One given in plain text was
    never stored (the config file holds `***`): tracking.uri may be given again, any other cannot."""
    try:
        resolved = OmegaConf.to_container(stored, resolve=True)
    except InterpolationResolutionError as error:
        raise VaelabError(
            f"cannot resume run {run_id}: its {error.full_key} is read from the environment, and {error.msg}; "
            "set it again"
        ) from None
    missing = [key for key, value in flatten(resolved).items() if is_redacted(value)]
    if missing == ["tracking.uri"]:
        raise VaelabError(
            f"cannot resume run {run_id}: its tracking.uri held a password, which vaelab does not store; "
            f"give it again (resume={run_id} tracking.uri=...)"
        )
    if missing:
        raise VaelabError(
            f"cannot resume run {run_id}: its {', '.join(missing)} held a secret in plain text, which vaelab does not "
            "store; start a new run, and pass secrets as ${oc.env:VAR} to keep a run resumable"
        )
