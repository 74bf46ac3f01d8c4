r"""The prior p(z), chosen with `prior=<name>` (conf/prior/).

    standard   p(z) = N(0, I)
    mog        a learned mixture of K diagonal Gaussians (vaelab.model.mixture_priors.MixtureOfGaussians)
    vamp       the VampPrior: the mixture of the encoder's base Gaussians at K learned pseudo-inputs
               (vaelab.model.mixture_priors.VampPrior)

A prior is an nn.Module (a learned one trains with the model) built with the latent size and the image shape; the
VAE binds itself to it, since the VampPrior scores latents through the VAE's own encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vaelab.model.distributions import LOG_2PI, standard_normal_log_prob

if TYPE_CHECKING:
    from vaelab.model.vae import VAE


class Prior(nn.Module):
    """p(z) over `latent_dim` dimensions: scores latents and draws them."""

    # p(z) is a product over latent dimensions (N(0, I)); a mixture is not.
    factorised = False

    def __init__(self, latent_dim: int, image_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.latent_dim = latent_dim

    def bind(self, vae: VAE) -> None:
        """Called once by the VAE that owns this prior (the VampPrior keeps a reference to encode with)."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), summed over the latent dimensions: [..., D] -> [...]."""
        raise NotImplementedError

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z_d) of each dimension's marginal: [..., D] -> [..., D]."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws [n, D]. The random numbers come from `generator` on the CPU (a seed gives the same latents on any
        device); the draws are on the prior's device (the CPU for a prior without weights)."""
        raise NotImplementedError


class StandardNormal(Prior):
    """N(0, I): no parameters."""

    factorised = True

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + z.pow(2))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, self.latent_dim), generator=generator)
