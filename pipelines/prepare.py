"""Prepare stage: raw dataset -> checksummed, split uint8 tensors + manifest in data/processed/<name>/.

python pipelines/prepare.py data=fashion_mnist
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vaelab.config import check_command_line, hydra_errors, validate
from vaelab.errors import exit_on_user_error
from vaelab.logs import quiet_third_party
from vaelab.tracking.lifecycle import stop_on_signals

os.environ.setdefault("VAELAB_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    with exit_on_user_error():
        validate(cfg)
        from vaelab.data.prepare import prepare
        from vaelab.data.settings import Settings

        manifest = prepare(Settings.from_config(cfg.data))
    counts = ", ".join(f"{name} {split['count']}" for name, split in manifest["splits"].items())
    print(f"prepared {manifest['dataset']} from {manifest['source']}: {counts}; data hash {manifest['data_hash'][:12]}")


if __name__ == "__main__":
    # A moved key is named with its new place before Hydra rejects it unnamed; Hydra's own errors (an unknown
    # option or key, an unparsable override) become the same one-line problems as a bad value.
    stop_on_signals()  # SIGTERM, at any point, ends the runs this process owns as Ctrl-C does: KILLED, exit 130
    with exit_on_user_error(), hydra_errors():
        check_command_line(sys.argv[1:])
        main()
