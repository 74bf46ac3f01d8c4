r"""The objectives, written out. Everything is in nats per image; higher bounds are better.

For a latent-variable model p(x, z) = p(x|z) p(z) and an encoder q(z|x):

    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))
    ELBO(x)  = E_q[log p(x|z)] - KL(q(z|x) || p(z))      = -rec - kl

KL(q || p(z|x)) >= 0, so the ELBO is a lower bound on log p(x), and since log p(x) does not depend
on q, maximizing the ELBO over q *is* minimizing the reverse KL from q to the true posterior.

Training objectives built on it (each reported as `train/loss` = minus the objective):
  * beta-VAE:   E_q[log p(x|z)] - beta * KL(q || p(z)). beta = 1 is the ELBO; beta != 1 is no longer
                a bound on log p(x), which is why `*/elbo` is always logged with beta = 1.
  * KL warm-up: beta ramps linearly from 0 to beta over `kl_warmup_epochs`, so the decoder learns
                before the KL term can collapse the posterior onto the prior.
  * free bits:  each latent dimension's batch-averaged KL is floored at `free_bits` nats, so the
                optimizer gains nothing by pushing a dimension's rate below it (Kingma et al. 2016).
  * IWAE:       log (1/k) sum_i p(x, z_i) / q(z_i|x) with z_i ~ q(z|x). It is >= the ELBO and
                tends to log p(x) as k grows (Burda et al. 2016); its gap is a tighter measure of
                KL(q || p(z|x)). It has no separate KL term, so beta and free bits do not apply.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per dimension, in closed form. [..., D] -> [..., D]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension. [..., D] -> [...]."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension. [..., D] -> [...]."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def kl_weight(beta: float, warmup_epochs: int, progress: float) -> float:
    """beta, ramped linearly from 0 over `warmup_epochs`; `progress` is the fractional epoch."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, progress / warmup_epochs)


def beta_vae_loss(rec: torch.Tensor, kl_per_dim: torch.Tensor, weight: float, free_bits: float = 0.0) -> torch.Tensor:
    """Minus the (beta-weighted, free-bits) objective, averaged over the batch.

    rec: [B] = -log p(x|z); kl_per_dim: [B, D] = KL(q(z_d|x) || p(z_d)).
    """
    if free_bits > 0:
        kl = torch.clamp(kl_per_dim.mean(0), min=free_bits).sum()  # floor each dim's batch-mean KL
    else:
        kl = kl_per_dim.sum(-1).mean()
    return rec.mean() + weight * kl


def iw_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_i w_i from log w: [k, B] -> [B]. k = 1 gives a one-sample ELBO estimate."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def bits_per_dim(nats_per_image: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert nats per image to bits per dimension (dims = C * H * W)."""
    return nats_per_image / (dims * math.log(2))
