"""The data layer: raw sources -> prepare (split, observe val/test once, manifest, hash) -> the in-memory datamodule.

Nothing here imports Lightning except `datamodule`, so preparing data stays a light import.
"""
