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
  * capacity:   E_q[log p(x|z)] - gamma * |KL(q || p(z)) - C|, with C ramped linearly from 0 to
                `capacity.nats` (Burgess et al. 2018). Instead of weighting the rate, it pins it to C:
                a beta-VAE with a moving, rate-dependent beta. At C = 0 it is a strong beta-VAE; it is
                a bound on log p(x) only through the ELBO logged beside it.
  * IWAE:       log (1/k) sum_i p(x, z_i) / q(z_i|x) with z_i ~ q(z|x). It is >= the ELBO and
                tends to log p(x) as k grows (Burda et al. 2016); its gap is a tighter measure of
                KL(q || p(z|x)). It has no separate KL term, so beta and free bits do not apply.
                As k grows the encoder's gradient gets noisier relative to its size (Rainforth et al.
                2018); `model.dreg` swaps in the doubly reparameterized estimator (Tucker et al. 2019),
                which has the same expectation and no score-function term.
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


def linear_ramp(final: float, epochs: float, progress: float) -> float:
    """`final`, ramped linearly from 0 over `epochs`; `progress` is the fractional epoch. Used for
    the KL weight's warm-up (final = beta) and the capacity schedule (final = capacity.nats)."""
    if epochs <= 0:
        return final
    return final * min(1.0, progress / epochs)


def beta_vae_loss(rec: torch.Tensor, kl_per_dim: torch.Tensor, weight: float, free_bits: float = 0.0) -> torch.Tensor:
    """Minus the (beta-weighted, free-bits) objective, averaged over the batch.

    rec: [B] = -log p(x|z); kl_per_dim: [B, D] = KL(q(z_d|x) || p(z_d)).
    """
    if free_bits > 0:
        kl = torch.clamp(kl_per_dim.mean(0), min=free_bits).sum()  # floor each dim's batch-mean KL
    else:
        kl = kl_per_dim.sum(-1).mean()
    return rec.mean() + weight * kl


def capacity_loss(rec: torch.Tensor, kl: torch.Tensor, gamma: float, capacity: float) -> torch.Tensor:
    """Minus Burgess et al.'s objective, averaged over the batch: rec + gamma * |KL - C|.

    rec, kl: [B]. The batch-mean KL is held near `capacity` nats from either side.
    """
    return rec.mean() + gamma * (kl.mean() - capacity).abs()


def iw_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_i w_i from log w: [k, B] -> [B]. k = 1 gives a one-sample ELBO estimate."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def dreg_iw_bound(log_px_z: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The IWAE bound [B], whose gradient is the doubly reparameterized one (DReG, Tucker et al. 2019).

    log_px_z: [k, B]; z: [k, B, D], drawn as mean + std * eps so gradients reach the encoder through it.
    The decoder's gradient is the IWAE gradient, sum_i w~_i d log w_i. The encoder's drops the
    score-function term (q's parameters are detached inside log q) and weights the path term by w~_i^2
    instead of w~_i, w~ being the normalized weights; in expectation the two are equal. When q(z|x) is the
    true posterior, log w is constant in z and the encoder's gradient is exactly 0.
    """
    log_w = log_px_z + standard_normal_log_prob(z) - gaussian_log_prob(z, mean.detach(), logvar.detach())
    w = torch.softmax(log_w.detach(), dim=0)  # [k, B]
    if z.requires_grad:
        # Only log w depends on z here, so scaling dL/dz by w~ turns w~ * path term into w~^2 * path term.
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))
    surrogate = (w * log_w).sum(0)
    return iw_bound(log_w).detach() + surrogate - surrogate.detach()  # the bound's value, DReG's gradient


def bits_per_dim(nats_per_image: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert nats per image to bits per dimension (dims = C * H * W)."""
    return nats_per_image / (dims * math.log(2))
