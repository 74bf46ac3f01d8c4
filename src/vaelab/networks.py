"""Encoder and decoder networks. `arch._target_` names a factory that returns both.

Every factory takes the image shape from the data, so 1x28x28 and 1x8x8 both work, and the number
of decoder outputs per channel from the likelihood (1 for Bernoulli logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# q(z|x)'s log-variance is clamped: exp(logvar) overflows or its gradient explodes outside this range,
# and a posterior std below e^-6 ~ 0.0025 only happens on the way to a numerical blow-up.
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x [B, C, H, W] -> (mean, logvar), each [B, latent_dim]: a diagonal Gaussian q(z|x)."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int], latent_dim: int):
        super().__init__()
        self.net = mlp([math.prod(image_shape), *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(x.flatten(1)).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class MLPDecoder(nn.Module):
    """z [..., latent_dim] -> likelihood parameters [..., P*C, H, W] (P parameters per channel)."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int], latent_dim: int, params_per_channel: int):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (params_per_channel * c, h, w)
        self.net = mlp([latent_dim, *reversed(hidden), math.prod(self.out_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.out_shape)


def build_mlp(
    image_shape: tuple[int, int, int], latent_dim: int, params_per_channel: int, hidden: list[int]
) -> tuple[nn.Module, nn.Module]:
    """The default architecture: fully connected, the decoder mirrors the encoder's hidden sizes."""
    hidden = list(hidden)
    return (
        MLPEncoder(image_shape, hidden, latent_dim),
        MLPDecoder(image_shape, hidden, latent_dim, params_per_channel),
    )
