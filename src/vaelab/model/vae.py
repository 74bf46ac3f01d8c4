"""The VAE: an encoder that picks q(z|x) from the posterior family, a decoder whose output parametrizes the
likelihood p(x|z), and the prior p(z). Each of the four is a component (conf/arch, conf/likelihood, conf/posterior,
conf/prior)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from vaelab.model.distributions import gaussian_kl, gaussian_log_prob
from vaelab.model.objectives import dreg_iw_bound, iw_bound
from vaelab.model.posteriors import DiagonalGaussian, Member, Posterior
from vaelab.model.priors import Prior, StandardNormal


@dataclass(eq=False)
class Pass:
    """One encode -> sample k latents -> decode pass: the pieces every bound is made of. All in nats.

    The derived terms are computed once each (cached): the loss and the logged metrics share them, and the DReG
    bound, which re-weights the encoder's gradient through z, exists at most once per pass."""

    q: Member  # q(z|x) for each image of the batch
    z: torch.Tensor  # [k, B, D]
    log_q: torch.Tensor  # [k, B]   log q(z_i|x), exact for every family
    log_px_z: torch.Tensor  # [k, B]   log p(x|z_i)
    prior: Prior

    @property
    def factorised(self) -> bool:
        """q(z|x) and p(z) both factorise over latent dimensions, so the per-dimension KLs sum to the KL."""
        return self.q.factorised and self.prior.factorised

    @cached_property
    def log_pz(self) -> torch.Tensor:
        """log p(z_i), [k, B]."""
        return self.prior.log_prob(self.z)

    @cached_property
    def rec(self) -> torch.Tensor:
        """-E_q[log p(x|z)], estimated with the k samples, [B]."""
        return -self.log_px_z.mean(0)

    @cached_property
    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || p(z)), [B]: in closed form against N(0, I) where the family has one, else the Monte-Carlo
        estimate E_q[log q(z|x) - log p(z)] over the k samples."""
        if isinstance(self.prior, StandardNormal):
            closed = self.q.kl_standard_normal()
            if closed is not None:
                return closed
        return (self.log_q - self.log_pz).mean(0)

    @cached_property
    def kl_per_dim(self) -> torch.Tensor:
        """KL(q(z_d|x) || p(z_d)) of each dimension's marginals, [B, D]. In closed form when both marginals are
        Gaussian with p = N(0, I); else a Monte-Carlo estimate over the k samples. A flow's marginals are taken as
        the Gaussians with the moments of its draws. Only when `factorised` do they sum to `kl`."""
        mean, logvar = self.q.marginals()
        if isinstance(self.prior, StandardNormal):
            return gaussian_kl(mean, logvar)
        z = self.z.detach()
        log_q_d = gaussian_log_prob(z.unsqueeze(-1), mean.unsqueeze(-1), logvar.unsqueeze(-1))  # [k, B, D]
        return (log_q_d - self.prior.marginal_log_prob(z)).mean(0)

    @cached_property
    def elbo(self) -> torch.Tensor:
        """E_q[log p(x|z)] - KL(q(z|x) || p(z)), [B]."""
        return -self.rec - self.kl

    @cached_property
    def log_weights(self) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i|x), [k, B]."""
        return self.log_px_z + self.log_pz - self.log_q

    @cached_property
    def iw_bound(self) -> torch.Tensor:
        """log (1/k) sum_i p(x, z_i) / q(z_i|x), [B]."""
        return iw_bound(self.log_weights)

    @cached_property
    def dreg_iw_bound(self) -> torch.Tensor:
        """The same bound, [B], with the doubly reparameterized encoder gradient (for training only). Cached: each
        computation would register another re-weighting of the gradient reaching z."""
        log_q = self.q.log_prob(self.z, detach_params=True)  # q's parameters detached
        return dreg_iw_bound(self.log_px_z + self.log_pz - log_q, self.z)


class VAE(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        posterior: Posterior | None = None,
        prior: Prior | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.posterior = posterior if posterior is not None else DiagonalGaussian(latent_dim)
        self.prior = prior if prior is not None else StandardNormal(latent_dim)
        self.prior.bind(self)

    @property
    def code_dim(self) -> int:
        """How many leading coordinates of z the decoder reads: all of them, or z1's of a two-layer model."""
        return getattr(self.decoder, "code_dim", self.latent_dim)

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z|x] over the coordinates the decoder reads, [B, code_dim]: what the pyfunc model and figures show."""
        return self.encode(x).expected_z()[..., : self.code_dim]

    def encode(self, x: torch.Tensor) -> Member:
        """q(z|x) for each image of x [B, C, H, W]."""
        return self.posterior(self.encoder(x))

    def decode_pass(self, x: torch.Tensor, q: Member, k: int = 1) -> Pass:
        """Draw k reparameterized latents from q(z|x) and score x under each."""
        z, log_q = q.rsample(k)  # [k, B, D], [k, B]
        log_px_z = self.likelihood.log_prob(x, self.decoder(z))  # [k, B]
        return Pass(q=q, z=z, log_q=log_q, log_px_z=log_px_z, prior=self.prior)

    def forward(self, x: torch.Tensor, k: int = 1) -> Pass:
        return self.decode_pass(x, self.encode(x), k=k)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = E_q[z|x]]: the deterministic reconstruction, for pictures."""
        return self.likelihood.mean(self.decoder(self.encode(x).expected_z()))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """E[x|z] for z ~ p(z): images from the prior, [n, C, H, W]."""
        device = next(self.parameters()).device
        z = self.prior.sample(n, generator).to(device)  # seeded on the CPU
        return self.likelihood.mean(self.decoder(z))
