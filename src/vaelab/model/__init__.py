"""The model layer: likelihoods, networks, the VAE, its objectives and the estimators that score it.

It imports torch and nothing of the pipeline around it (no Lightning, Hydra, MLflow, ...): import-linter checks
this (pyproject.toml), so the maths can be read, tested and reused on its own.
"""
