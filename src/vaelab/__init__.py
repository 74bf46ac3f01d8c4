"""vaelab: an experiment pipeline for Variational Autoencoders.

The package follows the data, in layers whose walls import-linter checks (pyproject.toml): `data` (sources ->
prepare -> the in-memory datamodule), `model` (the maths, torch only), `training` (the LightningModule, callbacks,
the component builder), `tracking` (the MLflow store and runs), `stages` (train, evaluate, publish, resume, export:
what `pipelines/` call), `sweep` and `search`. docs/architecture.md walks through them.
"""

__version__ = "0.2.0"
