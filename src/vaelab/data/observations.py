"""The val and test splits as every model sees them at evaluation: observed once, with the manifest's seed.

Training's datamodule and the evaluate stage both score models on these, and only training needs Lightning, so they
live apart from the datamodule: evaluating a checkpoint imports torch and the model layer only.
"""

from __future__ import annotations

import torch

from vaelab.data.prepare import EVAL_SEED_OFFSET
from vaelab.model.likelihoods import Likelihood


def fixed_observations(
    split: dict[str, torch.Tensor], name: str, likelihood: type[Likelihood], manifest: dict, limit: int | None = None
) -> torch.Tensor:
    """Split `name` (val or test) as the model sees it at evaluation, float32 [N, C, H, W], fixed by seed."""
    split = {k: v[:limit] for k, v in split.items()} if limit else split
    seed = manifest["binarize_seed"] + EVAL_SEED_OFFSET[name]
    return likelihood.observe_fixed(split, manifest["grey_levels"], seed)
