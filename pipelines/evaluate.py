"""Evaluate stage: test ELBO, importance-weighted NLL, bits/dim, active units and figures for a checkpoint.

python pipelines/evaluate.py                     # models/latest/, else the newest finished training run
python pipelines/evaluate.py ckpt=path/to.ckpt   # or a folder (outputs/<run_id>/), or run_id=<mlflow run id>

The checkpoint brings its own architecture and data settings. Keys given on the command line (model.latent_dim=8,
arch=conv, data=mnist) must match them, or evaluate stops with a message saying how they differ.
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
        from vaelab.stages.evaluate import evaluate

        summary = evaluate(cfg)
    print(
        f"test (k={cfg.eval.iw_k}, {summary['eval/n_images']} images): "
        f"elbo {summary['test/elbo']:.2f}  nll_iw {summary['test/nll_iw']:.2f} nats  "
        f"bpd {summary['test/bpd']:.4f}  inference_gap {summary['test/inference_gap']:.2f}  "
        f"active_units {summary['test/active_units']:.0f}"
    )


if __name__ == "__main__":
    # A moved key is named with its new place before Hydra rejects it unnamed; Hydra's own errors (an unknown
    # option or key, an unparsable override) become the same one-line problems as a bad value.
    stop_on_signals()  # SIGTERM, at any point, ends the runs this process owns as Ctrl-C does: KILLED, exit 130
    with exit_on_user_error(), hydra_errors():
        check_command_line(sys.argv[1:])
        main()
