"""vaelab: an experiment pipeline for Variational Autoencoders."""

import logging
import warnings

# lightning 2.6 on torch >= 2.14 warns about torch.utils._pytree.LeafSpec; it is harmless.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


# Lightning prints through its own handler *and* propagates to the root logger that Hydra configures,
# so every line appeared twice; keep Lightning's handler only. Its rank-zero messages also carry an
# advert for a hosted service at every fit; drop that. (Loggers are configured before lightning is
# imported: getLogger returns the same objects lightning will use.)
logging.getLogger("lightning").propagate = False
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdverts())

# MLflow's system-metrics monitor announces at INFO that it starts, stops and finds no GPU, at every run.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

__version__ = "0.1.0"
