"""The tracking layer: the MLflow store, a run with its lineage, and how runs end.

It imports no Lightning (import-linter checks this, pyproject.toml): the Lightning logger that writes into a run
lives with the stages, which connect training to tracking.
"""
