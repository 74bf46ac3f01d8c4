"""The entry points' console: Lightning's notices about the checkpoints vaelab restores and saves itself are quieted
(a resumed run names its checkpoint in its own line), as are the lines at every fit that a user cannot act on (no
accelerator here, the last epoch reached, an advert); everything else Lightning says still reaches the user."""

from __future__ import annotations

import logging
import warnings

import pytest

from vaelab.logs import quiet_third_party

LIGHTNING = "lightning.pytorch"
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"
CHECKPOINT_CONNECTOR = "lightning.pytorch.trainer.connectors.checkpoint_connector"
TOUCHED = ("lightning", LIGHTNING, RANK_ZERO, "lightning.fabric.utilities.rank_zero", CHECKPOINT_CONNECTOR)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def console():
    """The lines that reach Lightning's console handler once the entry points' quieting is on; the logging and
    warnings state is put back afterwards."""
    loggers = [logging.getLogger(name) for name in TOUCHED]
    saved = [(logger, logger.propagate, list(logger.filters), logger.level) for logger in loggers]
    lines = Lines()
    logging.getLogger(LIGHTNING).addHandler(lines)
    logging.getLogger(LIGHTNING).setLevel(logging.INFO)  # as Lightning sets it when imported
    try:
        with warnings.catch_warnings():
            quiet_third_party()
            yield lines
    finally:
        logging.getLogger(LIGHTNING).removeHandler(lines)
        for logger, propagate, filters, level in saved:
            logger.propagate, logger.filters, logger.level = propagate, filters, level


def test_lightnings_notices_about_restoring_and_saving_checkpoints_do_not_reach_the_console(console):
    checkpoint = "/project/outputs/0123/checkpoints/last.ckpt"
    logging.getLogger(RANK_ZERO).info(f"Restoring states from the checkpoint path at {checkpoint}")
    logging.getLogger(RANK_ZERO).info(f"Restored all states from the checkpoint at {checkpoint}")
    logging.getLogger(CHECKPOINT_CONNECTOR).info("`weights_only` was not set, defaulting to `False`.")
    logging.getLogger(RANK_ZERO).info("Trainer already configured with model summary callbacks")

    assert console.lines == ["Trainer already configured with model summary callbacks"]


def test_at_each_fit_only_what_a_user_can_act_on_reaches_the_console(console):
    said = [
        "GPU available: False, used: False",
        "TPU available: False, using: 0 TPU cores",
        "HPU available: False, using: 0 HPUs",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)",
        "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)",
        "`Trainer.fit` stopped: `max_epochs=4` reached.",
        # The ones that say something: a GPU there is (used or not), a run stopped before its last epoch.
        "GPU available: True (cuda), used: True",
        "GPU available: True (cuda), used: False",
        "`Trainer.fit` stopped: `max_steps=100` reached.",
    ]
    for line in said:
        logging.getLogger(RANK_ZERO).info(line)

    assert console.lines == said[-3:]


def test_lightnings_warnings_about_the_checkpoint_folder_and_the_logging_interval_are_quieted_and_others_are_not(
    console,
):
    kept = "The 'train_dataloader' does not have many workers which may be a bottleneck."
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("Checkpoint directory /project/outputs/0123/checkpoints exists and is not empty.", stacklevel=1)
        warnings.warn(
            "The number of training batches (21) is smaller than the logging interval Trainer(log_every_n_steps=50).",
            stacklevel=1,
        )
        warnings.warn(kept, stacklevel=1)

    assert [str(warning.message) for warning in seen] == [kept]
