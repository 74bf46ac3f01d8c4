"""The Lightning logger that writes a training run's per-epoch metrics into the MLflow run vaelab created."""

from __future__ import annotations

from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from vaelab.tracking.run import Run


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, minus ending the run: vaelab ends it after its own post-fit logging."""

    def finalize(self, status: str = "success") -> None:
        pass


class ServerRunLogger(RunLogger):
    """`logger=mlflow_server`: the same logger; its name tells validation that tracking.uri must be a server."""


def lightning_logger(run: Run, logger_cfg: DictConfig) -> MLFlowLogger:
    """The `logger` config's logger, attached to `run`."""
    logger = instantiate(logger_cfg, experiment_name=run.experiment, tracking_uri=run.uri, run_id=run.run_id)
    logger._mlflow_client = run.client  # its per-epoch metrics wait out a locked store too
    return logger
