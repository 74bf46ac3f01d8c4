r"""The variational family q(z|x), chosen with `posterior=<name>` (conf/posterior/).

The encoder maps x to the parameters of one member of the family; the posterior draws reparameterized latents from
it and scores them. Training takes the member closest to p(z|x) in reverse KL, so how rich the family is bounds how
small the inference gap can get.

    diag_gaussian   q(z|x) = N(mean, diag(exp(logvar)))   the encoder outputs (mean, logvar), each [B, D]
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.model.distributions import gaussian_kl, gaussian_log_prob
from vaelab.model.priors import Prior, StandardNormal


class DiagonalGaussian(nn.Module):
    """A factorised Gaussian: the classic VAE's q(z|x)."""

    def rsample(self, mean: torch.Tensor, logvar: torch.Tensor, k: int = 1) -> torch.Tensor:
        """k reparameterized draws z = mean + std * eps, [k, B, D], so gradients reach the encoder through z."""
        eps = torch.randn((k, *mean.shape), device=mean.device, dtype=mean.dtype)  # [k, B, D]
        return mean + torch.exp(0.5 * logvar) * eps

    def log_prob(self, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """log q(z|x), summed over the latent dimensions: [k, B, D] -> [k, B]."""
        return gaussian_log_prob(z, mean, logvar)

    def kl_per_dim(self, mean: torch.Tensor, logvar: torch.Tensor, prior: Prior) -> torch.Tensor:
        """KL(q(z_d|x) || p(z_d)) per dimension, [B, D]: in closed form against the standard normal prior."""
        if not isinstance(prior, StandardNormal):
            raise NotImplementedError(f"no closed-form KL between {type(self).__name__} and {type(prior).__name__}")
        return gaussian_kl(mean, logvar)
