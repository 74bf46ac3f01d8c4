"""Console hygiene for the entry points: quiet the third-party chatter that would bury vaelab's own lines.

Called by `pipelines/*.py` before they do anything else; importing vaelab itself configures nothing.
"""

from __future__ import annotations

import logging
import warnings


class _DropLines(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`; the logger's other records pass."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Lightning's adverts for a hosted service (logging, checkpoint uploads), at every fit.
_ADVERT = "💡 Tip: For seamless cloud "

# What Lightning says about the checkpoints vaelab itself restores and saves. A resumed run says in one line which
# checkpoint it goes on from (vaelab.stages.resume), and its checkpoint folder holds the run's earlier checkpoints
# by design; vaelab chooses weights_only at every load and save, where Lightning's default is the one it announces.
_CHECKPOINT_NOTICES = (
    "Restoring states from the checkpoint path at ",
    "Restored all states from the checkpoint at ",
    "`weights_only` was not set, defaulting to `False`.",
)

# What Lightning says at every fit that the user cannot act on: that no accelerator exists (on a machine with one,
# its "available: True" line still shows), and that the last epoch was reached (the progress bar already reads
# "epoch N/N"; any other reason to stop, such as max_steps, still shows).
_FIT_NOTICES = (
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
    "`Trainer.fit` stopped: `max_epochs=",
)


def quiet_third_party() -> None:
    # lightning 2.6 on torch >= 2.14 warns about torch.utils._pytree.LeafSpec; it is harmless.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    # Lightning prints through its own handler *and* propagates to the root logger that Hydra configures, so every
    # line appeared twice; keep Lightning's handler only. Its rank-zero messages also carry an advert for a hosted
    # service at every fit; drop that. (getLogger returns the same objects lightning will use once imported.)
    logging.getLogger("lightning").propagate = False
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLines(_ADVERT, *_CHECKPOINT_NOTICES, *_FIT_NOTICES))
    connector = "lightning.pytorch.trainer.connectors.checkpoint_connector"
    logging.getLogger(connector).addFilter(_DropLines(*_CHECKPOINT_NOTICES))
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty", category=UserWarning)
    # Every small run has fewer batches per epoch than Lightning's per-step logging interval. vaelab's curves are
    # per epoch (EpochHistory), so the per-step points this warns about are never missed.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    # MLflow's system-metrics monitor announces at INFO that it starts, stops and finds no GPU, at every run.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # Logging the pyfunc model checks its input example against its signature and says so at INFO; a mismatch is
    # still raised or warned about.
    logging.getLogger("mlflow.pyfunc").addFilter(_DropLines("Validating input example against model signature"))
    # A machine's first store: vaelab makes an empty migrated store once per MLflow version (tracking.store) and
    # MLflow announces each step of making it at INFO; its warnings and errors still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Matplotlib's one-off "generated new fontManager" on a machine's first figure.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
