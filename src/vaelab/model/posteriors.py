r"""The variational family q(z|x), chosen with `posterior=<name>` (conf/posterior/).

The encoder maps x to the parameters of one member of the family; the member draws reparameterized latents and
scores them. Training takes the member closest to p(z|x) in reverse KL, so how rich the family is bounds how small
the inference gap can get.

Every family here is a diagonal Gaussian *base* N(mean, diag(exp(logvar))) pushed through an invertible transform T:

    z0 ~ N(mean, diag(exp(logvar))),   z = T(z0),   log q(z|x) = log N(z0; mean, exp(logvar)) - log |det dT/dz0|

so log q(z|x) of every drawn z is exact, and the ELBO, the importance-weighted bound, the ESS and the gaps are valid
for every family. The families:

    diag_gaussian   T = identity                                    encoder outputs (mean, logvar)          2D
    full_gaussian   T(z0) = z0 + S (z0 - mean) / std, S strictly lower triangular, so z = mean + L eps with the
                    Cholesky factor L = diag(std) + S and log|det| = 0    (mean, logvar, S)       2D + D(D-1)/2
    planar          K planar steps (vaelab.model.flows.Planar)       (mean, logvar, u, w, b per step)  2D + K(2D+1)
    iaf             K inverse autoregressive steps (vaelab.model.flows.IAF), a context vector h     2D + context

A family is an nn.Module (its own weights, if any, such as IAF's MADE networks) whose `forward` turns the encoder's
output [B, encoder_outputs] into a `Member`: q(z|x) for each image of the batch.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from vaelab.model.distributions import gaussian_kl, gaussian_log_prob, standard_normal_log_prob

# The base's log-variance is clamped: exp(logvar) overflows or its gradient explodes outside this range,
# and a posterior std below e^-6 ~ 0.0025 only happens on the way to a numerical blow-up.
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0
# Draws that estimate E_q[z|x] and the marginal moments of a flow, from a fixed seed: the pyfunc model's output and
# the figures are then the same on every call.
MOMENT_SAMPLES = 64
MOMENT_SEED = 0


def mean_and_logvar(params: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 2D of a network's output [..., P] as a Gaussian's mean and clamped log-variance, each [..., D]."""
    mean, logvar = params[..., :latent_dim], params[..., latent_dim : 2 * latent_dim]
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def standard_noise(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) draws of `shape` on `like`'s device and dtype. With a generator they are drawn from it on the CPU, so
    a seed gives the same draws on any device."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


class Member:
    """q(z|x) for each image of a batch: the base N(mean, diag(exp(logvar))), mean and logvar [B, D], pushed through
    the family's transform. Subclasses override `transform` (and, where a closed form exists, the densities)."""

    # q(z|x) is a product over latent dimensions: per-dimension KLs add up to the KL.
    factorised = False
    # log q(z|x) can be evaluated at any z, not only at the z it drew (the DReG estimator needs it).
    has_density = False

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    @property
    def latent_dim(self) -> int:
        return self.mean.shape[-1]

    def transform(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = T(z0) and log |det dT/dz0|: [k, B, D] -> ([k, B, D], [k, B])."""
        return z0, z0.new_zeros(z0.shape[:-1])

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k reparameterized draws z [k, B, D] and their exact log q(z|x) [k, B]. With a generator, the noise is drawn
        on the CPU from it (the same draws on any device)."""
        eps = standard_noise((k, *self.mean.shape), self.mean, generator)
        z0 = self.mean + torch.exp(0.5 * self.logvar) * eps
        z, log_det = self.transform(z0)
        return z, gaussian_log_prob(z0, self.mean, self.logvar) - log_det

    def log_prob(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """log q(z|x) at any z [k, B, D] -> [k, B]; with `detach_params`, as a function of z alone (DReG)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no density at an arbitrary z (its transform has no closed-form inverse)"
        )

    def kl_standard_normal(self) -> torch.Tensor | None:
        """KL(q(z|x) || N(0, I)) in closed form [B], or None where there is none."""
        return None

    def gaussian_marginals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact marginals q(z_d|x) = N(m_d, exp(l_d)) as (m, l), each [B, D], when they are Gaussian; else None."""
        return None

    @cached_property
    def _moment_draws(self) -> torch.Tensor:
        with torch.no_grad():
            z, _ = self.rsample(MOMENT_SAMPLES, torch.Generator().manual_seed(MOMENT_SEED))
        return z  # [S, B, D]

    def expected_z(self) -> torch.Tensor:
        """E_q[z|x] [B, D]: exact for Gaussians, else the mean of MOMENT_SAMPLES fixed-seed draws."""
        marginals = self.gaussian_marginals()
        return marginals[0] if marginals is not None else self._moment_draws.mean(0)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian marginals (mean, log-variance), each [B, D]: exact where q's are Gaussian, else a Gaussian with the
        moments of MOMENT_SAMPLES fixed-seed draws (an approximation, used only for the per-dimension KL)."""
        marginals = self.gaussian_marginals()
        if marginals is not None:
            return marginals
        draws = self._moment_draws
        return draws.mean(0), draws.var(0).clamp_min(torch.finfo(draws.dtype).tiny).log()


class GaussianMember(Member):
    """N(mean, diag(exp(logvar))): the classic VAE's q(z|x)."""

    factorised = True
    has_density = True

    def log_prob(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        mean, logvar = (self.mean.detach(), self.logvar.detach()) if detach_params else (self.mean, self.logvar)
        return gaussian_log_prob(z, mean, logvar)

    def kl_standard_normal(self) -> torch.Tensor:
        return gaussian_kl(self.mean, self.logvar).sum(-1)

    def gaussian_marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.logvar


class Posterior(nn.Module):
    """A variational family over `latent_dim` dimensions: encoder output [B, encoder_outputs] -> Member."""

    # The mutual-information estimate needs q(z|x') at every image's z, for all pairs of images: a diagonal Gaussian
    # stands in for a family that is not one (this says which), None where q(z|x) is itself that Gaussian.
    mutual_info_from: str | None = "the base Gaussian N(mean, diag(exp(logvar))) of each q(z|x), before the flow"

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    @property
    def encoder_outputs(self) -> int:
        """How many numbers per image the encoder produces for this family."""
        return 2 * self.latent_dim

    def forward(self, params: torch.Tensor) -> Member:
        raise NotImplementedError


class DiagonalGaussian(Posterior):
    """q(z|x) = N(mean, diag(exp(logvar))): a factorised Gaussian."""

    mutual_info_from = None

    def forward(self, params: torch.Tensor) -> GaussianMember:
        return GaussianMember(*mean_and_logvar(params, self.latent_dim))


class FullGaussianMember(Member):
    """N(mean, L L^T) with the Cholesky factor L = diag(exp(logvar / 2)) + S, S [B, D, D] strictly lower triangular.

    Drawn as the base z0 = mean + std * eps followed by the shear z = z0 + S eps, whose Jacobian is unit triangular
    (log |det| = 0): so z = mean + L eps, and log q(z|x) = log N(z0; mean, diag(std^2)) = log N(z; mean, L L^T)."""

    has_density = True

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, shear: torch.Tensor):
        super().__init__(mean, logvar)
        self.shear = shear  # [B, D, D], zero on and above the diagonal

    @property
    def cholesky(self) -> torch.Tensor:
        """L [B, D, D], lower triangular with the positive diagonal exp(logvar / 2)."""
        return self.shear + torch.diag_embed(torch.exp(0.5 * self.logvar))

    def transform(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = (z0 - self.mean) * torch.exp(-0.5 * self.logvar)  # [k, B, D]
        z = z0 + (self.shear @ eps.unsqueeze(-1)).squeeze(-1)
        return z, z0.new_zeros(z0.shape[:-1])

    def log_prob(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        mean, logvar, cholesky = self.mean, self.logvar, self.cholesky
        if detach_params:
            mean, logvar, cholesky = mean.detach(), logvar.detach(), cholesky.detach()
        centred = (z - mean).unsqueeze(-1)  # [k, B, D, 1]
        eps = torch.linalg.solve_triangular(cholesky.expand(*centred.shape[:-2], -1, -1), centred, upper=False)
        return standard_normal_log_prob(eps.squeeze(-1)) - 0.5 * logvar.sum(-1)  # log|det L| = sum_d logvar_d / 2

    def kl_standard_normal(self) -> torch.Tensor:
        """0.5 (tr Sigma + |mean|^2 - D - log det Sigma), Sigma = L L^T."""
        trace = self.cholesky.pow(2).sum((-2, -1))
        return 0.5 * (trace + self.mean.pow(2).sum(-1) - self.latent_dim - self.logvar.sum(-1))

    def gaussian_marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.cholesky.pow(2).sum(-1).log()  # Sigma_dd = sum_j L_dj^2


class FullGaussian(Posterior):
    """q(z|x) = N(mean, L L^T), a full covariance through its Cholesky factor, whose diagonal is positive."""

    mutual_info_from = "the diagonal Gaussian with each q(z|x)'s marginals (its correlations left out)"

    @property
    def encoder_outputs(self) -> int:
        return 2 * self.latent_dim + self.latent_dim * (self.latent_dim - 1) // 2

    def forward(self, params: torch.Tensor) -> FullGaussianMember:
        mean, logvar = mean_and_logvar(params, self.latent_dim)
        rows, cols = torch.tril_indices(self.latent_dim, self.latent_dim, offset=-1, device=params.device)
        shear = params.new_zeros(len(params), self.latent_dim, self.latent_dim)
        shear[:, rows, cols] = params[:, 2 * self.latent_dim :]
        return FullGaussianMember(mean, logvar, shear)
