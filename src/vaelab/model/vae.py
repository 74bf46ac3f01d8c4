"""The VAE: an encoder that picks q(z|x) from the posterior family, a decoder whose output parametrizes the
likelihood p(x|z), and the prior p(z). Each of the four is a component (conf/arch, conf/likelihood, conf/posterior,
conf/prior)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from vaelab.model.objectives import dreg_iw_bound, iw_bound
from vaelab.model.posteriors import DiagonalGaussian
from vaelab.model.priors import Prior, StandardNormal


@dataclass
class Pass:
    """One encode -> sample k latents -> decode pass: the pieces every bound is made of. All in nats.

    The derived terms are computed once each (cached): the loss and the logged metrics share them."""

    mean: torch.Tensor  # [B, D]
    logvar: torch.Tensor  # [B, D]
    z: torch.Tensor  # [k, B, D]
    log_px_z: torch.Tensor  # [k, B]   log p(x|z_i)
    posterior: DiagonalGaussian
    prior: Prior

    @cached_property
    def kl_per_dim(self) -> torch.Tensor:
        """KL(q(z_d|x) || p(z_d)) in closed form, [B, D]."""
        return self.posterior.kl_per_dim(self.mean, self.logvar, self.prior)

    @cached_property
    def rec(self) -> torch.Tensor:
        """-E_q[log p(x|z)], estimated with the k samples, [B]."""
        return -self.log_px_z.mean(0)

    @cached_property
    def kl(self) -> torch.Tensor:
        return self.kl_per_dim.sum(-1)

    @cached_property
    def elbo(self) -> torch.Tensor:
        """E_q[log p(x|z)] - KL(q(z|x) || p(z)), [B]."""
        return -self.rec - self.kl

    @property
    def log_weights(self) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i|x), [k, B]."""
        return self.log_px_z + self.prior.log_prob(self.z) - self.posterior.log_prob(self.z, self.mean, self.logvar)

    @property
    def iw_bound(self) -> torch.Tensor:
        """log (1/k) sum_i p(x, z_i) / q(z_i|x), [B]."""
        return iw_bound(self.log_weights)

    @property
    def dreg_iw_bound(self) -> torch.Tensor:
        """The same bound, [B], with the doubly reparameterized encoder gradient (for training only)."""
        log_q = self.posterior.log_prob(self.z, self.mean.detach(), self.logvar.detach())  # q's parameters detached
        return dreg_iw_bound(self.log_px_z + self.prior.log_prob(self.z) - log_q, self.z)


class VAE(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        posterior: DiagonalGaussian | None = None,
        prior: Prior | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.posterior = posterior if posterior is not None else DiagonalGaussian()
        self.prior = prior if prior is not None else StandardNormal()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode_pass(self, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, k: int = 1) -> Pass:
        """Draw k reparameterized latents from q(z|x) and score x under each."""
        z = self.posterior.rsample(mean, logvar, k)  # [k, B, D]
        log_px_z = self.likelihood.log_prob(x, self.decoder(z))  # [k, B]
        return Pass(mean=mean, logvar=logvar, z=z, log_px_z=log_px_z, posterior=self.posterior, prior=self.prior)

    def forward(self, x: torch.Tensor, k: int = 1) -> Pass:
        return self.decode_pass(x, *self.encode(x), k=k)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = posterior mean]: the deterministic reconstruction, for pictures."""
        mean, _ = self.encode(x)
        return self.likelihood.mean(self.decoder(mean))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """E[x|z] for z ~ p(z): images from the prior, [n, C, H, W]."""
        device = next(self.parameters()).device
        z = self.prior.sample(n, self.latent_dim, generator).to(device)  # seeded on the CPU
        return self.likelihood.mean(self.decoder(z))
