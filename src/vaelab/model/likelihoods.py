r"""Decoder likelihoods p(x|z). Each returns a true log-likelihood of the *discrete* data in nats per
image, summed over pixels, so ELBOs and NLLs of different likelihoods on the same 8-bit images compare.

A likelihood also decides how the uint8 data is presented to the model (`observe`), and so names the
data representation: `binary` (binarized images) or `8bit` (the grey levels themselves). Numbers from
different representations are not comparable; every run is tagged with its representation.

    Bernoulli  binary  x_bin ~ Bernoulli(x / (L-1)), afresh at each use in training (dynamic binarization)
    Gaussian   8bit    y = (x + u) / L, u ~ U[0,1)^D (uniform dequantization). For any density p on [0,1)^D,
                       log P(x) >= E_u[log p(y)] - D log L   (Jensen; the bin of x has volume L^-D),
                       so `log_prob` returns log p(y) - D log L: a bound on the discrete log-likelihood.
    Logistic   8bit    a discretized logistic: the exact probability of x's bin, edge bins open to +-inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def binarize(images: torch.Tensor, grey_levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_bin ~ Bernoulli(x / (levels - 1)), as uint8 0/1. Without a generator: fresh each call."""
    probs = images.float() / (grey_levels - 1)
    return torch.bernoulli(probs, generator=generator).to(torch.uint8)


class Likelihood(nn.Module):
    """p(x|z) over images with `grey_levels` levels. Subclasses set `representation` and `params_per_channel`."""

    representation = "8bit"
    params_per_channel = 1

    def __init__(self, grey_levels: int = 256):
        super().__init__()
        self.grey_levels = grey_levels

    @classmethod
    def observe(cls, images: torch.Tensor, grey_levels: int, generator: torch.Generator | None = None):
        """uint8 grey levels [N, C, H, W] -> float32 model input; random parts use `generator` if given."""
        raise NotImplementedError

    @classmethod
    def observe_fixed(cls, split: dict[str, torch.Tensor], grey_levels: int, seed: int) -> torch.Tensor:
        """A val/test split, observed once with a fixed seed: every model is scored on the same input."""
        return cls.observe(split["images"], grey_levels, torch.Generator().manual_seed(seed))

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: [..., C, H, W] as observed; params: [..., P*C, H, W]. Returns [...] in nats."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """An image in [0, 1] to look at (the distribution's mean or centre)."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(logit_i)) over binary pixels."""

    representation = "binary"
    params_per_channel = 1  # one logit per pixel

    @classmethod
    def observe(cls, images, grey_levels, generator=None):
        return binarize(images, grey_levels, generator).float()

    @classmethod
    def observe_fixed(cls, split, grey_levels, seed):
        return split["binary"].float()  # binarized once by the prepare stage, with this seed

    def log_prob(self, x, params):
        # -BCE-with-logits is log Bernoulli, computed stably for large |logit|.
        log_px = -F.binary_cross_entropy_with_logits(params, x.expand_as(params), reduction="none")
        return log_px.flatten(-3).sum(-1)

    def mean(self, params):
        return torch.sigmoid(params)


class Gaussian(Likelihood):
    """N(y; mu, sigma^2) on dequantized y in [0, 1), with a learned per-pixel or global sigma >= min_std.

    The floor matters: Fashion-MNIST's border pixels are always 0, and without dequantization and a floor
    a Gaussian could shrink sigma there until the density, and the "likelihood", goes to infinity.
    """

    def __init__(self, grey_levels: int = 256, variance: str = "pixel", min_std: float = 1e-3):
        super().__init__(grey_levels)
        if variance not in ("pixel", "global"):
            raise ValueError(f"variance {variance!r} not in ['pixel', 'global']")
        self.variance = variance
        self.min_std = min_std
        if variance == "global":
            self.raw_std = nn.Parameter(torch.zeros(()))  # one sigma for every pixel

    @property
    def params_per_channel(self) -> int:  # type: ignore[override]
        return 2 if self.variance == "pixel" else 1

    @classmethod
    def observe(cls, images, grey_levels, generator=None):
        noise = torch.rand(images.shape, generator=generator, device=images.device if generator is None else "cpu")
        return (images.float() + noise.to(images.device)) / grey_levels

    def _mean_std(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.variance == "pixel":
            mu, raw = params.chunk(2, dim=-3)
        else:
            mu, raw = params, self.raw_std.expand_as(params)
        return mu, self.min_std + F.softplus(raw)

    def log_prob(self, x, params):
        mu, std = self._mean_std(params)
        log_density = -0.5 * math.log(2 * math.pi) - torch.log(std) - 0.5 * ((x - mu) / std) ** 2
        dims = x.shape[-3:].numel()
        return log_density.flatten(-3).sum(-1) - dims * math.log(self.grey_levels)  # bin volume L^-D

    def mean(self, params):
        return self._mean_std(params)[0].clamp(0, 1)


class DiscretizedLogistic(Likelihood):
    """P(x) = CDF(upper edge of x's bin) - CDF(lower edge), logistic CDF, over L levels on [0, 1].

    Bin centres c = x / (L-1), half-width h = 1 / (2 (L-1)); the first and last bins extend to -inf / +inf,
    so the probabilities of the L bins sum to exactly 1.
    """

    params_per_channel = 2  # location and log-scale per pixel
    MIN_LOG_SCALE = -7.0  # scale >= e^-7 ~ 1e-3 of the [0, 1] range: below a bin's width even for L = 256

    @classmethod
    def observe(cls, images, grey_levels, generator=None):
        return images.float() / (grey_levels - 1)  # bin centres; nothing random

    def log_prob(self, x, params):
        loc, log_scale = params.chunk(2, dim=-3)
        inv_scale = torch.exp(-log_scale.clamp(min=self.MIN_LOG_SCALE))
        half_bin = 0.5 / (self.grey_levels - 1)
        x = x.expand_as(loc)
        upper = (x + half_bin - loc) * inv_scale  # a: standardized upper edge
        lower = (x - half_bin - loc) * inv_scale  # b: standardized lower edge
        upper = torch.where(x > 1 - half_bin, torch.full_like(upper, math.inf), upper)
        lower = torch.where(x < half_bin, torch.full_like(lower, -math.inf), lower)
        # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) - softplus(b) + log(1 - e^(b - a)), stable for a > b,
        # and it reduces to the edge cases: log sigmoid(a) when b = -inf, -softplus(b) when a = +inf.
        log_p = F.logsigmoid(upper) - F.softplus(lower) + torch.log(-torch.expm1(lower - upper))
        return log_p.flatten(-3).sum(-1)

    def mean(self, params):
        return params.chunk(2, dim=-3)[0].clamp(0, 1)
