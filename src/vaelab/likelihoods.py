"""Decoder likelihoods p(x|z). Each returns a true log-likelihood in nats per image, summed over pixels.

A likelihood also names the data representation it models (`binary` or `8bit`): numbers from
different representations are not comparable, so every run is tagged with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bernoulli(nn.Module):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(logit_i)) over binary pixels."""

    representation = "binary"
    params_per_channel = 1  # one logit per pixel

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: [..., C, H, W] in {0, 1}; params: logits of the same shape. Returns [...] in nats."""
        # -BCE-with-logits is log Bernoulli, computed stably for large |logit|.
        log_px = -F.binary_cross_entropy_with_logits(params, x.expand_as(params), reduction="none")
        return log_px.flatten(-3).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel probabilities, for pictures."""
        return torch.sigmoid(params)
