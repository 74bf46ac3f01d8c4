r"""Learned mixture priors: p(z) = sum_k pi_k N(z; m_k, diag(exp(l_k))), all densities in nats.

    MixtureOfGaussians   K free components: learned weights pi, means m_k and log-variances l_k.
    VampPrior            (Tomczak & Welling 2018) uniform weights 1/K; (m_k, l_k) are the base Gaussian of the VAE's
                         own q(z|u_k) at K learned pseudo-inputs u_k, so the prior moves with the encoder.

Neither factorises over latent dimensions, so the KL is the Monte-Carlo estimate E_q[log q(z|x) - log p(z)]; each
dimension's marginal is an exact 1-D mixture.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from vaelab.model.distributions import LOG_2PI
from vaelab.model.posteriors import LOGVAR_MAX, LOGVAR_MIN
from vaelab.model.priors import Prior

if TYPE_CHECKING:
    from vaelab.model.vae import VAE

# Elements of the [rows, K, D] table of per-component, per-dimension log-densities built at once: an evaluation
# scores up to 2^18 latents a chunk, and 2^18 x 100 components x 32 dimensions would be gigabytes.
TABLE_ELEMENTS = 1 << 24


def _component_log_probs(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """log N(z_d; m_kd, exp(l_kd)) for every component and dimension: z [N, D], means and logvars [K, D] ->
    [N, K, D]."""
    z = z.unsqueeze(-2)
    return -0.5 * (LOG_2PI + logvars + (z - means).pow(2) * torch.exp(-logvars))


def _in_row_chunks(z: torch.Tensor, components: int, score) -> torch.Tensor:
    """`score` ([N, D] -> [N, ...]) over z [..., D] flattened to rows, in chunks that keep the [rows, K, D] table
    under TABLE_ELEMENTS; the result is reshaped back to z's leading dimensions."""
    rows = z.reshape(-1, z.shape[-1])
    chunk = max(1, TABLE_ELEMENTS // (components * z.shape[-1]))
    scored = torch.cat([score(part) for part in rows.split(chunk)]) if len(rows) > chunk else score(rows)
    return scored.reshape(*z.shape[:-1], *scored.shape[1:])


def mixture_log_prob(
    z: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor
) -> torch.Tensor:
    """log sum_k pi_k N(z; m_k, diag(exp(l_k))): z [..., D], log_weights [K] (normalised), means and logvars [K, D]
    -> [...] in nats."""

    def score(rows: torch.Tensor) -> torch.Tensor:
        per_component = _component_log_probs(rows, means, logvars).sum(-1)  # [N, K]
        return torch.logsumexp(log_weights + per_component, dim=-1)

    return _in_row_chunks(z, len(means), score)


def mixture_marginal_log_prob(
    z: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor
) -> torch.Tensor:
    """log sum_k pi_k N(z_d; m_kd, exp(l_kd)) of each dimension's 1-D marginal: z [..., D] -> [..., D] in nats."""

    def score(rows: torch.Tensor) -> torch.Tensor:
        per_component = _component_log_probs(rows, means, logvars)  # [N, K, D]
        return torch.logsumexp(log_weights.unsqueeze(-1) + per_component, dim=-2)

    return _in_row_chunks(z, len(means), score)


def mixture_sample(
    n: int,
    log_weights: torch.Tensor,
    means: torch.Tensor,
    logvars: torch.Tensor,
    generator: torch.Generator | None,
    uniform: bool = False,
) -> torch.Tensor:
    """n draws [n, D]: a component by the weights (any of the K alike when `uniform`), then its Gaussian. The random
    numbers are drawn on the CPU from `generator`, so a seed gives the same latents on any device; the draws are on
    the means' device."""
    components, dims = means.shape
    if uniform:
        index = torch.randint(components, (n,), generator=generator)
    else:
        probs = log_weights.detach().cpu().double().softmax(-1)  # computed on the CPU: the same choice on any device
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
    eps = torch.randn((n, dims), generator=generator, dtype=means.dtype)
    index, eps = index.to(means.device), eps.to(means.device)
    return means[index] + torch.exp(0.5 * logvars[index]) * eps


class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag(exp(l_k))), K = `components`, every part learned with the model.

    Starts with equal weights, unit variances and means drawn from N(0, I) (torch's global generator, which vaelab
    seeds before building): distinct means let the components specialise instead of moving as one."""

    def __init__(self, latent_dim: int, components: int, image_shape: tuple[int, ...] | None = None):
        super().__init__(latent_dim, image_shape)
        if components < 1:
            raise ValueError(f"components must be at least 1, got {components}")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))  # [K], pi = softmax(logits)
        self.means = nn.Parameter(torch.randn(components, latent_dim))  # [K, D]
        self.raw_logvars = nn.Parameter(torch.zeros(components, latent_dim))  # [K, D]

    @property
    def log_weights(self) -> torch.Tensor:
        """log pi_k, [K]."""
        return torch.log_softmax(self.logits, dim=-1)

    @property
    def logvars(self) -> torch.Tensor:
        """l_k, [K, D], clamped to the posterior's range: a component shrinking onto a single latent would make
        log p(z) grow without bound."""
        return self.raw_logvars.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, self.log_weights, self.means, self.logvars)

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_marginal_log_prob(z, self.log_weights, self.means, self.logvars)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return mixture_sample(n, self.log_weights, self.means, self.logvars, generator)


class VampPrior(Prior):
    """p(z) = (1/K) sum_k N(z; m(u_k), diag(exp(l(u_k)))) with (m, l) the base Gaussian of q(z|u_k), the VAE's own
    posterior family at K = `components` learned pseudo-inputs u_k [K, C, H, W].

    The base Gaussian is used for every family: a flow's density at an arbitrary z would need its inverse. The prior
    scores latents through the VAE's encoder, so it must be bound to a VAE (the VAE does so when built) before
    `log_prob`, `marginal_log_prob` or `sample`."""

    def __init__(self, latent_dim: int, components: int, image_shape: tuple[int, ...] | None = None):
        super().__init__(latent_dim, image_shape)
        if components < 1:
            raise ValueError(f"components must be at least 1, got {components}")
        if image_shape is None:
            raise ValueError("the VampPrior needs image_shape: its pseudo-inputs are images")
        self.components = components
        # u = sigmoid(raw) keeps the pseudo-inputs inside [0, 1], the range every likelihood's `observe` gives the
        # encoder (binary pixels, dequantized or bin-centre grey levels). raw near 0 puts them at the range's middle,
        # grey images halfway between every datum, so no component starts inside one class; the small noise makes
        # the K pseudo-inputs differ, since identical ones would get identical gradients and never separate.
        self.raw_pseudo_inputs = nn.Parameter(0.1 * torch.randn(components, *image_shape))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """u_k in the encoder's input range [0, 1], [K, C, H, W]."""
        return torch.sigmoid(self.raw_pseudo_inputs)

    def bind(self, vae: VAE) -> None:
        # Stored outside nn.Module's registries: the VAE owns this prior, so registering it back would duplicate its
        # parameters and state-dict keys and make .modules() cycle.
        self.__dict__["_vae"] = vae

    def _mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log weights [K], means [K, D], log-variances [K, D]) of the mixture under the encoder's current weights."""
        vae: VAE | None = self.__dict__.get("_vae")
        if vae is None:
            raise RuntimeError(
                "this VampPrior is not bound to a VAE: it scores latents through the VAE's encoder, and VAE(..., "
                "prior=...) binds it"
            )
        q = vae.posterior(vae.encoder(self.pseudo_inputs))  # read at call time: the encoder may have been compiled
        log_weights = q.mean.new_full((self.components,), -math.log(self.components))
        return log_weights, q.mean, q.logvar

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, *self._mixture())

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_marginal_log_prob(z, *self._mixture())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return mixture_sample(n, *self._mixture(), generator, uniform=True)
