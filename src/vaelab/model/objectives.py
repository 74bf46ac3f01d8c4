r"""The objectives, written out. Everything is in nats per image; higher bounds are better.

For a latent-variable model p(x, z) = p(x|z) p(z) and an encoder q(z|x):

    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))
    ELBO(x)  = E_q[log p(x|z)] - KL(q(z|x) || p(z))      = -rec - kl

KL(q || p(z|x)) >= 0, so the ELBO is a lower bound on log p(x), and since log p(x) does not depend
on q, maximizing the ELBO over q *is* minimizing the reverse KL from q to the true posterior.

The KL term is in closed form where one exists (a diagonal or full-covariance Gaussian q against the standard normal
prior). Otherwise (a flow posterior, a learned prior) it is the Monte-Carlo estimate E_q[log q(z|x) - log p(z)] over
the pass's own samples: unbiased, since log q(z|x) of every drawn z is exact (vaelab.model.posteriors).

Training objectives built on it (each reported as `train/loss` = minus the objective):
  * beta-VAE:   E_q[log p(x|z)] - beta * KL(q || p(z)). beta = 1 is the ELBO; beta != 1 is no longer
                a bound on log p(x), which is why `*/elbo` is always logged with beta = 1.
  * KL warm-up: beta ramps linearly from 0 to beta over `kl_warmup_epochs`, so the decoder learns
                before the KL term can collapse the posterior onto the prior.
  * free bits:  each latent dimension's batch-averaged KL is floored at `free_bits` nats, so the
                optimizer gains nothing by pushing a dimension's rate below it (Kingma et al. 2016). When q or
                p(z) is not factorised the dimensions' KLs do not add up, so the whole KL is floored at
                free_bits * D, the D dimensions as one group.
  * capacity:   E_q[log p(x|z)] - gamma * |KL(q || p(z)) - C|, with C ramped linearly from 0 to
                `nats` (Burgess et al. 2018). Instead of weighting the rate, it pins it to C:
                a beta-VAE with a moving, rate-dependent beta. At C = 0 it is a strong beta-VAE; it is
                a bound on log p(x) only through the ELBO logged beside it.
  * IWAE:       log (1/k) sum_i p(x, z_i) / q(z_i|x) with z_i ~ q(z|x). It is >= the ELBO and
                tends to log p(x) as k grows (Burda et al. 2016); its gap is a tighter measure of
                KL(q || p(z|x)). It has no separate KL term, so beta and free bits do not apply.
                As k grows the encoder's gradient gets noisier relative to its size (Rainforth et al.
                2018); `dreg` swaps in the doubly reparameterized estimator (Tucker et al. 2019),
                which has the same expectation and no score-function term. It needs log q(z|x) at any z, so
                it is refused for flow posteriors (whose transforms have no closed-form inverse).

Each is a component, chosen with `objective=<name>` (conf/objective/): `ELBO` (beta, warm-up, free bits; the
default), `Capacity` and `IWAE`. An option holds only its own keys, so a combination that means nothing (IWAE with
beta != 1, capacity with free bits) cannot be written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vaelab.model.vae import Pass


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


def dreg_iw_bound(log_w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The IWAE bound [B], whose gradient is the doubly reparameterized one (DReG, Tucker et al. 2019).

    log_w: [k, B] = log p(x|z_i) + log p(z_i) - log q(z_i|x) with q's parameters *detached*, so that the encoder
    reaches log w only through z: [k, B, D], drawn as a reparameterized sample. The decoder's gradient is the IWAE
    gradient, sum_i w~_i d log w_i. The encoder's drops the score-function term and weights the path term by w~_i^2
    instead of w~_i, w~ being the normalized weights; in expectation the two are equal. When q(z|x) is the true
    posterior, log w is constant in z and the encoder's gradient is exactly 0.
    """
    w = torch.softmax(log_w.detach(), dim=0)  # [k, B]
    if z.requires_grad:
        # Only log w depends on z here, so scaling dL/dz by w~ turns w~ * path term into w~^2 * path term.
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))
    surrogate = (w * log_w).sum(0)
    return iw_bound(log_w).detach() + surrogate - surrogate.detach()  # the bound's value, DReG's gradient


def bits_per_dim(nats_per_image: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert nats per image to bits per dimension (dims = C * H * W)."""
    return nats_per_image / (dims * math.log(2))


# -- the objectives as components (conf/objective/<name>.yaml names one with its `_target_`) -------------------------


class Objective:
    """A training objective. `loss` is minus it, averaged over the batch: what is minimized and logged as train/loss.

    `latent_samples` is how many latents per image a training pass draws; `ramp_epochs` how many epochs the objective
    keeps changing (a warm-up, a capacity ramp): those epochs, the ramp's last included, optimised another objective
    and are never chosen as the best checkpoint (unless the run ends before the ramp does: its last epoch is)."""

    latent_samples: int = 1

    @property
    def ramp_epochs(self) -> int:
        return 0

    def loss(self, out: Pass, progress: float) -> torch.Tensor:
        """Minus the objective for one pass [scalar]; `progress` is the training progress in fractional epochs."""
        raise NotImplementedError

    def logged(self) -> dict[str, float]:
        """Values of the objective's own schedule to log at the epoch's end (e.g. the capacity target)."""
        return {}


@dataclass
class ELBO(Objective):
    """E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), beta ramped up over `kl_warmup_epochs`, each latent dimension's KL
    floored at `free_bits` nats. beta = 1 with neither is the plain ELBO."""

    beta: float = 1.0
    kl_warmup_epochs: int = 0
    free_bits: float = 0.0

    @property
    def ramp_epochs(self) -> int:
        return self.kl_warmup_epochs

    def loss(self, out: Pass, progress: float) -> torch.Tensor:
        weight = linear_ramp(self.beta, self.kl_warmup_epochs, progress)  # beta itself without a warm-up
        if self.free_bits > 0 and not out.factorised:
            # Per-dimension KLs do not add up to the KL here: the floor holds the whole KL, as one group of D
            # dimensions (Kingma et al. 2016 floor groups of latents).
            return beta_vae_loss(out.rec, out.kl.unsqueeze(-1), weight, self.free_bits * out.z.shape[-1])
        kl = out.kl_per_dim if self.free_bits > 0 else out.kl.unsqueeze(-1)
        return beta_vae_loss(out.rec, kl, weight, self.free_bits)


@dataclass
class Capacity(Objective):
    """E_q[log p(x|z)] - gamma * |KL(q(z|x) || p(z)) - C|, the target C ramped from 0 to `nats` over `epochs`."""

    nats: float = 25.0
    epochs: int = 10
    gamma: float = 1000.0
    current: float = field(default=0.0, init=False)  # C at the last step, logged as train/capacity

    @property
    def ramp_epochs(self) -> int:
        return self.epochs

    def loss(self, out: Pass, progress: float) -> torch.Tensor:
        self.current = linear_ramp(self.nats, self.epochs, progress)
        return capacity_loss(out.rec, out.kl, self.gamma, self.current)

    def logged(self) -> dict[str, float]:
        return {"train/capacity": float(self.current)}


@dataclass
class IWAE(Objective):
    """log (1/k) sum_i p(x, z_i) / q(z_i|x) over k latents per image; `dreg` for the doubly reparameterized encoder
    gradient."""

    k: int = 5
    dreg: bool = False

    @property
    def latent_samples(self) -> int:  # type: ignore[override]
        return self.k

    def loss(self, out: Pass, progress: float) -> torch.Tensor:
        return -(out.dreg_iw_bound if self.dreg else out.iw_bound).mean()
