"""Train stage: one VAE (or, with -m, a Hydra multirun sweep), tracked in MLflow.

python pipelines/train.py model.latent_dim=8 model.beta=4
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("VAELAB_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from vaelab.config import validate
    from vaelab.errors import exit_on_user_error

    with exit_on_user_error():
        validate(cfg)  # before the heavy imports: a typo fails in a second
        from vaelab.training import train

        summary = train(cfg)
    print(
        f"trained: val/elbo {summary['val/elbo']:.2f} nats, val/nll_iw {summary['val/nll_iw']:.2f} nats "
        f"(best epoch {summary['best_epoch']:.0f}), {summary['train/images_per_sec']:.0f} images/s"
    )
    return summary["val/elbo"]


if __name__ == "__main__":
    main()
