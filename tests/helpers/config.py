"""The project's configs as the entry points compose them, and the small settings the tests train with."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vaelab.data.sources import fashion_mnist_folder

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


# Small but real: scikit-learn's digits, one or two epochs, few importance samples.
TINY = [
    "data=digits",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "eval.iw_k=20",
    "eval.val_iw_k=4",
    "arch.hidden=[64]",
    "model.latent_dim=4",
]


# One tiny search trial or sweep job: one epoch of TINY's model. (TINY's latent_dim stays the config's, so a search
# may sample it.)
TINY_TRIAL = [o for o in TINY if not o.startswith(("trainer.max_epochs=", "model.latent_dim="))] + [
    "trainer.max_epochs=1"
]


# A run long enough to signal mid-way: small batches make each digits epoch take ~1 s, so a signal sent after the
# first checkpoint lands between two.
SIGNAL_EPOCHS = 8
SIGNALLABLE = [*TINY, f"trainer.max_epochs={SIGNAL_EPOCHS}", "data.batch_size=16"]

DEBIAN_FASHION = fashion_mnist_folder()
needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup installs it as root)",
)


def make_config(*overrides: str):
    """Compose conf/train.yaml the way the entry points do."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def make_search_config(*overrides: str):
    """Compose conf/train.yaml as a search (`hydra/sweeper=optuna`) with `overrides`, keeping the hydra node: a
    search's settings are in `cfg.hydra.sweeper`, as vaelab.config.search_problems reads them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/sweeper=optuna", *overrides], return_hydra_config=True)
