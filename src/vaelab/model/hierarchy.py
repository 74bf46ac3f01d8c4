r"""Two stochastic layers (`arch=mlp2`): Burda, Grosse & Salakhutdinov 2016's two-layer model.

    generative   p(z2) p(z1|z2) p(x|z1)       z2 -> 2 x 100 tanh -> z1 -> 2 x 200 tanh -> x
    inference    q(z1|x) q(z2|z1)              x -> 2 x 200 tanh -> z1 -> 2 x 100 tanh -> z2

The VAE's latent z is the concatenation (z1, z2), of size sum(arch.latent_dims), so every bound, estimator and
objective of a one-layer VAE applies unchanged to the joint: log q(z|x) = log q(z1|x) + log q(z2|z1) and
log p(z) = log p(z2) + log p(z1|z2) are exact, and the importance weights are p(x, z1, z2) / q(z1, z2|x).

The posterior family chosen with `posterior=` is q(z1|x) (its local parameters are the encoder's output); q(z2|z1)
is a diagonal Gaussian whose network belongs to the family, like IAF's MADE weights, so the gap split refines
q(z1|x) per image with q(z2|z1) held fixed. The prior chosen with `prior=` is p(z2); p(z1|z2) is a diagonal Gaussian
whose network belongs to the prior.

The decoder reads z1 only, the model's code: the pyfunc model's codes, the traversals, interpolations and the latent
scatter are z1's (`VAE.code_dim` coordinates).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from vaelab.model.distributions import gaussian_log_prob
from vaelab.model.networks import MLPDecoder, MLPEncoder, mlp
from vaelab.model.posteriors import Member, Posterior, mean_and_logvar, standard_noise
from vaelab.model.priors import Prior


class ConditionalGaussian(nn.Module):
    """N(mean(u), diag(exp(logvar(u)))) over `out_dim` dimensions, given u [..., in_dim]: one stochastic layer's
    distribution given its neighbour."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int], activation: str):
        super().__init__()
        self.out_dim = out_dim
        # The hidden layers end in the nonlinearity too: the last linear layer gives (mean, logvar).
        self.net = mlp([in_dim, *hidden, 2 * out_dim], activation)

    def forward(self, u: torch.Tensor, detach_params: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each [..., out_dim]; with `detach_params`, as a function of u alone (DReG)."""
        if detach_params:
            out = functional_call(self.net, {name: p.detach() for name, p in self.net.named_parameters()}, (u,))
        else:
            out = self.net(u)
        return mean_and_logvar(out, self.out_dim)


class TwoLayerMember(Member):
    """q(z1, z2|x) = q(z1|x) q(z2|z1) for each image of a batch; z = (z1, z2) [..., D1 + D2]. Its `mean` and
    `logvar` are q(z1|x)'s base Gaussian (the mutual-information estimate's stand-in, a statement about z1)."""

    factorised = False

    def __init__(self, first: Member, second: ConditionalGaussian):
        super().__init__(first.mean, first.logvar)
        self.first, self.second = first, second
        self.has_density = first.has_density

    @property
    def latent_dim(self) -> int:
        return self.first.latent_dim + self.second.out_dim

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z1, log_q1 = self.first.rsample(k, generator)  # [k, B, D1], [k, B]
        mean, logvar = self.second(z1)
        z2 = mean + torch.exp(0.5 * logvar) * standard_noise(mean.shape, mean, generator)
        return torch.cat([z1, z2], -1), log_q1 + gaussian_log_prob(z2, mean, logvar)

    def log_prob(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        z1, z2 = z.split([self.first.latent_dim, self.second.out_dim], dim=-1)
        mean, logvar = self.second(z1, detach_params=detach_params)
        return self.first.log_prob(z1, detach_params=detach_params) + gaussian_log_prob(z2, mean, logvar)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """z1's exact marginals where q(z1|x) has Gaussian ones; z2's from the moments of the fixed-seed draws."""
        mean, logvar = super().marginals()
        first = self.first.gaussian_marginals()
        if first is None:
            return mean, logvar
        d1 = self.first.latent_dim
        return torch.cat([first[0], mean[..., d1:]], -1), torch.cat([first[1], logvar[..., d1:]], -1)

    def expected_z(self) -> torch.Tensor:
        """E_q[z1|x] as q(z1|x) has it (exact for a Gaussian), and E_q[z2|x] from the fixed-seed draws."""
        z1 = self.first.expected_z()
        return torch.cat([z1, self._moment_draws[..., z1.shape[-1] :].mean(0)], -1)


class TwoLayerPosterior(Posterior):
    """q(z1|x) from the family `first` (on the encoder's output), then q(z2|z1) from this family's own network."""

    def __init__(self, first: Posterior, second_dim: int, hidden: list[int], activation: str):
        super().__init__(first.latent_dim + second_dim)
        self.first = first
        self.second = ConditionalGaussian(first.latent_dim, second_dim, hidden, activation)
        self.mutual_info_from = "q(z1|x) alone: " + (first.mutual_info_from or "the diagonal Gaussian it is")

    @property
    def encoder_outputs(self) -> int:
        return self.first.encoder_outputs

    def forward(self, params: torch.Tensor) -> TwoLayerMember:
        return TwoLayerMember(self.first(params), self.second)


class TwoLayerPrior(Prior):
    """p(z1, z2) = p(z2) p(z1|z2): `top` is p(z2) (any one-layer prior but the VampPrior), p(z1|z2) this prior's own
    network. z = (z1, z2)."""

    def __init__(self, top: Prior, first_dim: int, hidden: list[int], activation: str):
        super().__init__(first_dim + top.latent_dim)
        self.top, self.first_dim = top, first_dim
        self.conditional = ConditionalGaussian(top.latent_dim, first_dim, hidden, activation)

    def bind(self, vae) -> None:
        self.top.bind(vae)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z.split([self.first_dim, self.top.latent_dim], dim=-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.split(z)
        mean, logvar = self.conditional(z2)
        return self.top.log_prob(z2) + gaussian_log_prob(z1, mean, logvar)

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z2_d) for z2, and for z1 the conditional log p(z1_d|z2) in place of the intractable marginal: the
        per-dimension KL of a two-layer model is that of each layer given the one above."""
        z1, z2 = self.split(z)
        mean, logvar = self.conditional(z2)
        within = gaussian_log_prob(z1.unsqueeze(-1), mean.unsqueeze(-1), logvar.unsqueeze(-1))  # per dimension
        return torch.cat([within, self.top.marginal_log_prob(z2)], -1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        weight = next(self.conditional.parameters())  # the device and dtype p(z1|z2) computes in
        z2 = self.top.sample(n, generator).to(weight)
        mean, logvar = self.conditional(z2)
        return torch.cat([mean + torch.exp(0.5 * logvar) * standard_noise(mean.shape, weight, generator), z2], -1)


class FirstLayerDecoder(MLPDecoder):
    """p(x|z1): reads the first `code_dim` coordinates of z, so it takes the joint (z1, z2) or z1 alone."""

    def __init__(self, image_shape, hidden: list[int], code_dim: int, params_per_channel: int, activation: str):
        super().__init__(image_shape, hidden, code_dim, params_per_channel, activation)
        self.code_dim = code_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z[..., : self.code_dim])


def build_mlp2(
    image_shape: tuple[int, int, int],
    latent_dim: int,
    params_per_channel: int,
    latent_dims: list[int],
    hidden: list[int],
    top_hidden: list[int],
    activation: str = "tanh",
    encoder_outputs: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The networks between x and z1: x -> `hidden` -> q(z1|x)'s parameters, and z1 -> reversed `hidden` -> p(x|z1).
    The ones between z1 and z2 (`top_hidden`) belong to the two-layer family and prior (`two_layer`)."""
    hidden = list(hidden)
    return (
        MLPEncoder(image_shape, hidden, encoder_outputs or 2 * latent_dims[0], activation),
        FirstLayerDecoder(image_shape, hidden, latent_dims[0], params_per_channel, activation),
    )


def two_layer(
    first: Posterior, top: Prior, latent_dims: list[int], top_hidden: list[int], activation: str
) -> tuple[TwoLayerPosterior, TwoLayerPrior]:
    """q(z1|x) q(z2|z1) around the family `first` of q(z1|x), and p(z2) p(z1|z2) around the prior `top` of z2."""
    first_dim, second_dim = latent_dims
    return (
        TwoLayerPosterior(first, second_dim, top_hidden, activation),
        TwoLayerPrior(top, first_dim, top_hidden, activation),
    )
