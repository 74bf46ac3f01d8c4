r"""Normalizing-flow families q(z|x): a diagonal Gaussian base pushed through K invertible steps.

    planar  z <- z + u_hat tanh(w^T z + b)                 (Rezende & Mohamed 2015)
            u, w [B, D] and b [B] per step come from the encoder, so every image gets its own flow.
    iaf     z <- sigma * z + (1 - sigma) * m,  sigma = sigmoid(s),  (m, s) = MADE_k(z, h)   (Kingma et al. 2016)
            the MADE networks are the family's own weights; the encoder supplies a context vector h [B, context].

Each step returns its log |det dz'/dz|; the member adds them up, so log q(z|x) of every drawn z is exact (see
vaelab.model.posteriors). Neither has a closed-form inverse, so neither can evaluate log q at an arbitrary z
(`has_density` stays False, the DReG estimator is not available) and neither factorises over latent dimensions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vaelab.model.posteriors import Member, Posterior, mean_and_logvar

# IAF's gate starts at sigmoid(GATE_BIAS) ~ 0.88: each step begins close to the identity, so a new flow starts out
# as the diagonal Gaussian it refines, and the gradient reaching z0 (scaled by the product of the gates) is not
# attenuated step after step. This is the forget-gate bias of the IAF paper.
GATE_BIAS = 2.0


# -- planar --------------------------------------------------------------------------------------------------------


def invertible_planar_u(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u_hat = u + (m(w^T u) - w^T u) w / |w|^2 with m(a) = -1 + softplus(a), so that w^T u_hat = m(w^T u) > -1 and
    the step z + u_hat tanh(w^T z + b) is invertible. u, w [..., D] -> [..., D]."""
    wu = (w * u).sum(-1, keepdim=True)
    # |w|^2 is floored only so that w = 0 exactly (a pure translation) gives u_hat = u instead of 0/0.
    w_norm2 = w.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (F.softplus(wu) - 1.0 - wu) * w / w_norm2


class PlanarMember(Member):
    """q(z|x): the base N(mean, diag(exp(logvar))) [B, D] followed by K planar steps with per-image parameters
    u, w [B, K, D] and b [B, K] (u as the encoder produced it; the invertible u_hat is derived here)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        super().__init__(mean, logvar)
        self.u_hat, self.w, self.b = invertible_planar_u(u, w), w, b
        # 1 + w^T u_hat, [B, K]: softplus(w^T u), computed as such rather than as 1 + w^T u_hat, which cancels
        # catastrophically as w^T u_hat approaches -1. `kept` is the share of the correction that the floor on
        # |w|^2 left in u_hat: 1 unless |w|^2 is below the smallest normal float.
        wu, w_norm2 = (w * u).sum(-1), w.pow(2).sum(-1)
        kept = w_norm2 / w_norm2.clamp_min(torch.finfo(w.dtype).tiny)
        self.one_plus_wu_hat = kept * F.softplus(wu) + (1.0 - kept) * (1.0 + wu)

    @property
    def steps(self) -> int:
        return self.b.shape[-1]

    def transform(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[k, B, D] -> ([k, B, D], [k, B]). Each step's Jacobian is I + u_hat tanh'(a) w^T (a = w^T z + b), whose
        determinant is 1 + tanh'(a) w^T u_hat = tanh(a)^2 + (1 + w^T u_hat)(1 - tanh(a)^2): a sum of two
        non-negative terms, so its log is taken without cancellation and without an absolute value."""
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for step in range(self.steps):
            u_hat, w, b = self.u_hat[:, step], self.w[:, step], self.b[:, step]  # [B, D], [B, D], [B]
            h = torch.tanh((z * w).sum(-1) + b)  # [k, B]
            z = z + u_hat * h.unsqueeze(-1)
            det = h.pow(2) + self.one_plus_wu_hat[:, step] * (1.0 - h.pow(2))
            # Both terms can underflow together (a = 0 and w^T u very negative); the floor keeps log finite.
            log_det = log_det + det.clamp_min(torch.finfo(det.dtype).tiny).log()
        return z, log_det


class Planar(Posterior):
    """K planar steps on a diagonal Gaussian. Encoder outputs per image: mean, logvar [D each], then for each step
    u [D], w [D], b [1]: 2D + K(2D + 1) in all."""

    def __init__(self, latent_dim: int, steps: int):
        super().__init__(latent_dim)
        self.steps = steps

    @property
    def encoder_outputs(self) -> int:
        return 2 * self.latent_dim + self.steps * (2 * self.latent_dim + 1)

    def forward(self, params: torch.Tensor) -> PlanarMember:
        d = self.latent_dim
        mean, logvar = mean_and_logvar(params, d)
        per_step = params[:, 2 * d :].reshape(len(params), self.steps, 2 * d + 1)  # [B, K, 2D + 1]
        return PlanarMember(mean, logvar, per_step[..., :d], per_step[..., d : 2 * d], per_step[..., 2 * d])


# -- inverse autoregressive flow -----------------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """A linear layer whose weight [out, in] is multiplied by a fixed 0/1 mask (a buffer: it follows .to(device) and
    is saved with the model)."""

    def __init__(self, mask: torch.Tensor, bias: bool = True):
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(latent_dim: int, hidden: list[int], reverse: bool) -> list[torch.Tensor]:
    """The MADE degrees of the inputs, then of each hidden layer: the inputs are numbered 1..D in the step's order
    (D..1 when `reverse`), hidden units cycle through 1..D-1 (deterministic, so a seed fixes the model everywhere).
    With D = 1 the hidden units get degree 0: they see the context only."""
    inputs = torch.arange(1, latent_dim + 1)
    degrees = [inputs.flip(0) if reverse else inputs]
    for width in hidden:
        cycle = torch.arange(width) % (latent_dim - 1) + 1 if latent_dim > 1 else torch.zeros(width, dtype=torch.long)
        degrees.append(cycle)
    return degrees


class MADE(nn.Module):
    """(m, s) [..., D] each from z [..., D] and a context h [B, C]: output d depends only on the inputs that precede
    it in the order (degree < its own), and on h without restriction (an unmasked linear map of h is added to the
    first hidden layer)."""

    def __init__(self, latent_dim: int, hidden: list[int], context: int, reverse: bool):
        super().__init__()
        degrees = made_degrees(latent_dim, hidden, reverse)
        # A hidden unit of degree k may see inputs of degree <= k; an output of degree d only units of degree < d.
        self.layers = nn.ModuleList(
            MaskedLinear((later[:, None] >= earlier[None, :]).float())
            for earlier, later in zip(degrees[:-1], degrees[1:], strict=True)
        )
        self.context = nn.Linear(context, hidden[0], bias=False)
        output_mask = (degrees[0][:, None] > degrees[-1][None, :]).float()  # [D, H]
        self.output = MaskedLinear(output_mask.repeat(2, 1))  # rows: m_1..m_D, then s_1..s_D
        with torch.no_grad():
            self.output.bias[latent_dim:].add_(GATE_BIAS)
        self.register_buffer("order", degrees[0] - 1)  # position of each variable in the step's order

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.elu(self.layers[0](z) + self.context(h))
        for layer in self.layers[1:]:
            x = F.elu(layer(x))
        m, s = self.output(x).chunk(2, dim=-1)
        return m, s


class IAFMember(Member):
    """q(z|x): the base N(mean, diag(exp(logvar))) [B, D] followed by the family's IAF steps, each conditioned on
    this image's context h [B, C]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, context: torch.Tensor, steps: nn.ModuleList):
        super().__init__(mean, logvar)
        self.context, self.steps = context, steps

    def transform(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[k, B, D] -> ([k, B, D], [k, B]). Each step's Jacobian is triangular in its order with diagonal sigma, so
        log |det| = sum_d log sigma_d."""
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for made in self.steps:
            m, s = made(z, self.context)
            sigma = torch.sigmoid(s)
            # The gated update is a convex combination: it neither blows up nor divides by a small scale.
            z = sigma * z + torch.sigmoid(-s) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det


class IAF(Posterior):
    """K inverse autoregressive steps on a diagonal Gaussian, with MADE networks of hidden widths `hidden` as the
    family's own weights, the order of the variables reversed from one step to the next. Encoder outputs per
    image: mean, logvar [D each] and the context h [context]: 2D + context in all."""

    def __init__(self, latent_dim: int, steps: int, hidden: list[int], context: int):
        super().__init__(latent_dim)
        self.context_size = context
        self.steps = nn.ModuleList(MADE(latent_dim, list(hidden), context, reverse=k % 2 == 1) for k in range(steps))

    @property
    def encoder_outputs(self) -> int:
        return 2 * self.latent_dim + self.context_size

    def forward(self, params: torch.Tensor) -> IAFMember:
        mean, logvar = mean_and_logvar(params, self.latent_dim)
        return IAFMember(mean, logvar, params[:, 2 * self.latent_dim :], self.steps)
