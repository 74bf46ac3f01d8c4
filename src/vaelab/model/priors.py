r"""The prior p(z), chosen with `prior=<name>` (conf/prior/).

    standard   p(z) = N(0, I)
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.model.distributions import standard_normal_log_prob


class Prior(nn.Module):
    """p(z) over `latent_dim` dimensions: scores latents and draws them."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), summed over the latent dimensions: [..., D] -> [...]."""
        raise NotImplementedError

    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, [n, D], on the CPU (so a seeded generator gives the same latents on any device)."""
        raise NotImplementedError


class StandardNormal(Prior):
    """N(0, I): no parameters."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)

    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, latent_dim), generator=generator)
