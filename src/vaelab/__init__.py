"""vaelab: an experiment pipeline for Variational Autoencoders."""

import logging
import warnings

# lightning 2.6 on torch >= 2.14 warns about torch.utils._pytree.LeafSpec; it is harmless.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


# Lightning prints through its own handler *and* propagates to the root logger that Hydra configures,
# so every line appeared twice; keep Lightning's handler only, and drop its advert for a hosted service.
_lightning = logging.getLogger("lightning")
_lightning.propagate = False
for _handler in _lightning.handlers:
    _handler.addFilter(_DropAdverts())

__version__ = "0.1.0"
