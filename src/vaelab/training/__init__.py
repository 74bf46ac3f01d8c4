"""The training layer: the LightningModule (a VAE and its objective), vaelab's callbacks, and the builder that turns
plain config values into components through one trusted-target list.

It imports no Hydra, OmegaConf, MLflow or Optuna (import-linter checks this, pyproject.toml): what it is given is
plain values, and what it produces is a trained module; the stages layer connects it to configs and tracking.
"""
