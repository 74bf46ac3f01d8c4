"""The variational families q(z|x): every drawn z comes with its exact log q(z|x), each flow step is invertible
with the Jacobian it claims, and each family reaches the true posterior of a linear-Gaussian model when that
posterior lies in the family (and falls short by the known amount when it does not)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import MultivariateNormal, Normal

from vaelab.model.distributions import gaussian_log_prob, standard_normal_log_prob
from vaelab.model.flows import IAF, IAFMember, Planar, invertible_planar_u
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.networks import build_mlp
from vaelab.model.objectives import ELBO, IWAE
from vaelab.model.posteriors import DiagonalGaussian, FullGaussian, Posterior
from vaelab.model.vae import VAE

FAMILIES: dict[str, Callable[[int], Posterior]] = {
    "diag_gaussian": DiagonalGaussian,
    "full_gaussian": FullGaussian,
    "planar": lambda d: Planar(d, steps=4),
    "iaf": lambda d: IAF(d, steps=3, hidden=[16, 16], context=5),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: a second thread only adds synchronisation (ten times slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family(name: str, latent_dim: int, seed: int = 0) -> Posterior:
    torch.manual_seed(seed)  # IAF's MADE weights
    return FAMILIES[name](latent_dim).double()


def random_params(posterior: Posterior, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, posterior.encoder_outputs, generator=torch.Generator().manual_seed(seed)).double()


def log_abs_det(function: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor) -> torch.Tensor:
    return torch.linalg.slogdet(jacobian(function, point))[1]


# -- exact log q(z|x) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full_gaussian", "planar", "iaf"])
def test_rsample_returns_the_change_of_variables_density_of_the_whole_transform(name: str):
    """log q(z|x) = log N(z0; base) - log |det dz/dz0|, the Jacobian taken by brute force for one image."""
    posterior = family(name, latent_dim=3)
    q = posterior(random_params(posterior, batch=2, seed=1))
    z, log_q = q.rsample(4, torch.Generator().manual_seed(2))
    eps = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z0 = q.mean + torch.exp(0.5 * q.logvar) * eps  # the base draws rsample made
    for image in range(2):
        mean, logvar = q.mean[image], q.logvar[image]

        def transform(point: torch.Tensor, image: int = image) -> torch.Tensor:
            batch = z0[0].clone().index_put((torch.tensor(image),), point)  # this image's z0 among the batch's
            return q.transform(batch.unsqueeze(0))[0][0, image]

        for draw in range(4):
            point = z0[draw, image]
            expected = gaussian_log_prob(point, mean, logvar) - log_abs_det(transform, point)
            torch.testing.assert_close(transform(point), z[draw, image], atol=1e-12, rtol=0)
            torch.testing.assert_close(log_q[draw, image], expected, atol=1e-6, rtol=0)


# -- planar --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [-10.0, -1e3, 0.0, 10.0])
def test_planar_steps_stay_invertible_for_adversarial_encoder_outputs(scale: float):
    """u = scale * w drives w^T u far below -1 (or far above); the constraint keeps w^T u_hat >= -1, the step's
    Jacobian determinant positive and its log finite everywhere, and the map increasing along w."""
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    u, b = scale * w, torch.randn(5, generator=generator, dtype=torch.float64)
    u_hat = invertible_planar_u(u, w)
    rounding = 1e-14 * u.norm(dim=-1) * w.norm(dim=-1)  # w^T u_hat is a difference of terms as large as |u| |w|
    assert torch.all((w * u_hat).sum(-1) >= -1 - rounding)

    posterior = Planar(3, steps=1)
    params = torch.cat([torch.zeros(5, 6, dtype=torch.float64), u, w, b[:, None]], dim=1)
    q = posterior(params)
    # Points along each image's w, through the point where tanh' = 1 (w^T z + b = 0), where a step bends most.
    t = torch.linspace(-5, 5, 2001, dtype=torch.float64)[:, None, None]  # [T, 1, 1]
    unit = w / w.norm(dim=-1, keepdim=True)
    line = t * unit - (b / w.norm(dim=-1))[:, None] * unit  # [T, 5, 3]
    z, log_det = q.transform(line)
    assert torch.all(torch.isfinite(log_det))
    assert torch.all(((z * unit).sum(-1).diff(dim=0)) > 0)  # injective along the line
    for image in range(5):

        def step(point: torch.Tensor, image: int = image) -> torch.Tensor:
            batch = line[0].clone().index_put((torch.tensor(image),), point)
            return q.transform(batch.unsqueeze(0))[0][0, image]

        for index in range(0, len(line), 200):
            # The determinant the step reports, exp(log_det) > 0, is the true one (to rounding: at u = -1000 w it is
            # e^-3000 at the bend, below what a float64 holds).
            det = torch.linalg.det(jacobian(step, line[index, image]))
            torch.testing.assert_close(det, log_det[index, image].exp(), atol=1e-12, rtol=1e-9)


def test_a_planar_step_with_w_zero_is_a_translation_with_unit_determinant():
    posterior = Planar(2, steps=1)
    u, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5]])
    q = posterior(torch.cat([torch.zeros(1, 4), u, torch.zeros(1, 2), b], dim=1))
    z0 = torch.randn(3, 1, 2)
    z, log_det = q.transform(z0)
    torch.testing.assert_close(z, z0 + u * math.tanh(0.5))
    torch.testing.assert_close(log_det, torch.zeros(3, 1))


# -- IAF -----------------------------------------------------------------------------------------------------------


def test_each_iaf_step_is_autoregressive_in_its_order_with_the_gates_on_the_diagonal():
    """dz_i/dz_j = 0 whenever j comes after i in the step's order; dz_i/dz_i = sigma_i; and every earlier variable
    does reach a later one, so the step is not merely diagonal."""
    d = 4
    posterior = family("iaf", latent_dim=d)
    q = posterior(random_params(posterior, batch=1, seed=4))
    point = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for made in posterior.steps:
        one_step = IAFMember(q.mean, q.logvar, q.context, torch.nn.ModuleList([made]))
        jac = jacobian(lambda z, one_step=one_step: one_step.transform(z.view(1, 1, d))[0].view(d), point)
        position = made.order  # position of each variable in this step's order
        later = position[None, :] > position[:, None]  # [i, j]: j comes after i
        earlier = position[None, :] < position[:, None]
        assert torch.all(jac[later] == 0)
        assert torch.all(jac[earlier] != 0)
        _, s = made(point.view(1, 1, d), q.context)
        torch.testing.assert_close(jac.diagonal(), torch.sigmoid(s).view(d))


def test_iaf_reverses_the_order_from_one_step_to_the_next():
    posterior = IAF(5, steps=3, hidden=[8], context=2)
    orders = [made.order.tolist() for made in posterior.steps]
    assert orders == [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]


def test_iaf_masks_are_buffers_and_the_same_for_every_seed():
    first, second = (IAF(4, steps=2, hidden=[12, 12], context=3) for _ in range(2))
    masks = {name for name, _ in first.named_buffers() if name.endswith("mask")}
    assert masks and not any(name.endswith("mask") for name, _ in first.named_parameters())
    for name in masks:
        torch.testing.assert_close(first.get_buffer(name), second.get_buffer(name), atol=0, rtol=0)
    assert first.double().get_buffer(next(iter(masks))).dtype == torch.float64  # masks follow .to()


def test_iaf_starts_near_the_identity_with_open_gates():
    """The gate bias makes each step start mostly as z <- z: the flow begins as the base Gaussian it refines."""
    posterior = family("iaf", latent_dim=3)
    q = posterior(random_params(posterior, batch=8, seed=6))
    z0 = torch.randn(10, 8, 3, dtype=torch.float64)
    _, log_det = q.transform(z0)
    assert torch.all(log_det / (3 * len(posterior.steps)) > math.log(0.5))  # mean log sigma: sigma well above 1/2


# -- full_gaussian -------------------------------------------------------------------------------------------------


def test_full_gaussian_with_a_diagonal_cholesky_factor_is_the_diagonal_gaussian():
    d = 3
    mean_logvar = torch.randn(5, 2 * d, dtype=torch.float64)
    params = torch.cat([mean_logvar, torch.zeros(5, d * (d - 1) // 2, dtype=torch.float64)], dim=1)
    full, diag = FullGaussian(d)(params), DiagonalGaussian(d)(mean_logvar)
    z_full, log_q_full = full.rsample(6, torch.Generator().manual_seed(7))
    z_diag, log_q_diag = diag.rsample(6, torch.Generator().manual_seed(7))
    torch.testing.assert_close(z_full, z_diag, atol=0, rtol=0)
    torch.testing.assert_close(log_q_full, log_q_diag)
    torch.testing.assert_close(full.log_prob(z_full), diag.log_prob(z_full))
    torch.testing.assert_close(full.kl_standard_normal(), diag.kl_standard_normal())


def full_gaussian_member(seed: int):
    d = 3
    params = torch.randn(4, 2 * d + d * (d - 1) // 2, generator=torch.Generator().manual_seed(seed)).double()
    return FullGaussian(d)(params)


def test_full_gaussian_closed_form_kl_equals_a_monte_carlo_estimate():
    q = full_gaussian_member(seed=8)
    z, log_q = q.rsample(200_000, torch.Generator().manual_seed(9))
    log_ratio = log_q - standard_normal_log_prob(z)  # [S, B]
    mc, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    assert torch.all((mc - q.kl_standard_normal()).abs() < 5 * stderr)


def test_full_gaussian_log_prob_is_the_multivariate_normal_density_and_agrees_with_its_draws():
    q = full_gaussian_member(seed=10)
    z = 3 * torch.randn(7, 4, 3, dtype=torch.float64)
    expected = MultivariateNormal(q.mean, scale_tril=q.cholesky).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), expected)
    torch.testing.assert_close(q.log_prob(z, detach_params=True), expected)
    # The draws come from that same density (DReG scores them with log_prob, the bounds with rsample's log q).
    drawn, log_q = q.rsample(5, torch.Generator().manual_seed(11))
    torch.testing.assert_close(q.log_prob(drawn), log_q)


# -- a model whose posterior is known: p(z) = N(0, I), p(x|z) = N(W z + c, s^2 I) ----------------------------------


class LinearGaussian:
    """log p(x) = log N(x; c, W W^T + s^2 I); p(z|x) = N(Lambda^-1 W^T (x - c) / s^2, Lambda^-1), with the
    precision Lambda = I + W^T W / s^2."""

    def __init__(self, weight: torch.Tensor, offset: torch.Tensor, noise: float, x: torch.Tensor):
        self.weight, self.offset, self.noise, self.x = weight, offset, noise, x
        d = weight.shape[1]
        self.precision = torch.eye(d, dtype=weight.dtype) + weight.T @ weight / noise**2
        self.posterior_mean = torch.linalg.solve(self.precision, weight.T @ (x - offset) / noise**2)
        covariance = weight @ weight.T + noise**2 * torch.eye(len(x), dtype=weight.dtype)
        self.log_evidence = MultivariateNormal(offset, covariance).log_prob(x)

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) [...] for z [..., D]."""
        return Normal(z @ self.weight.T + self.offset, self.noise).log_prob(self.x).sum(-1) + standard_normal_log_prob(
            z
        )

    def elbo(self, posterior: Posterior, params: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, float]:
        """The Monte-Carlo ELBO E_q[log p(x, z) - log q(z|x)] and its standard error, in nats."""
        z, log_q = posterior(params).rsample(samples, torch.Generator().manual_seed(seed))
        log_w = (self.log_joint(z) - log_q).squeeze(-1)  # [S]
        return log_w.mean(), (log_w.std() / math.sqrt(samples)).item()


def linear_gaussian(correlated: bool) -> LinearGaussian:
    generator = torch.Generator().manual_seed(11)
    if correlated:
        weight = torch.tensor([[1.0, 0.9], [0.8, 1.0], [0.5, 0.7], [0.0, 0.3]], dtype=torch.float64)
    else:  # orthogonal columns: W^T W, Lambda and the posterior covariance are diagonal
        q, _ = torch.linalg.qr(torch.randn(4, 2, generator=generator, dtype=torch.float64))
        weight = q * torch.tensor([1.5, 0.6], dtype=torch.float64)
    offset, x = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    return LinearGaussian(weight, offset, noise=0.7, x=x)


def fitted_params(model: LinearGaussian, posterior: Posterior, steps: int = 300) -> torch.Tensor:
    """Encoder outputs for this one x (and the family's own weights, IAF's MADEs), fitted to the ELBO by Adam with
    fresh draws at every step (a fixed set of draws lets a flow fit its noise) and a learning rate annealed to 0."""
    params = 0.1 * torch.randn(1, posterior.encoder_outputs, generator=torch.Generator().manual_seed(12)).double()
    params.requires_grad_(True)
    optimizer = torch.optim.Adam([params, *posterior.parameters()], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        optimizer.zero_grad()
        (-model.elbo(posterior, params, samples=128, seed=1000 + step)[0]).backward()
        optimizer.step()
        schedule.step()
    return params.detach()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_reaches_log_px_when_the_posterior_is_diagonal(name: str):
    """KL(q || p(z|x)) = log p(x) - ELBO >= 0, measured on draws the fit never saw. A wrong log-determinant would let
    the fit push the ELBO above log p(x); q = p(z) leaves a gap of 2.6 nats. The fitted gaps are below 4e-3 nats, so
    0.01 nats leaves room for the optimiser, and the standard error of 20000 draws of a nearly constant log-weight
    is below 1e-3 nats."""
    model, posterior = linear_gaussian(correlated=False), family(name, latent_dim=2)
    elbo, stderr = model.elbo(posterior, fitted_params(model, posterior), samples=20_000, seed=14)
    assert elbo < model.log_evidence + 4 * stderr  # a bound, within MC error
    assert model.log_evidence - elbo < 0.01 + 4 * stderr


def test_full_gaussian_reaches_log_px_and_diagonal_falls_short_by_the_mean_field_gap_when_correlated():
    """The best factorised q has the variances 1 / Lambda_ii (Turner & Sahani) and misses log p(x) by
    KL = 1/2 (sum_i log Lambda_ii - log det Lambda); a full covariance is exact."""
    model = linear_gaussian(correlated=True)
    gap = 0.5 * (model.precision.diagonal().log().sum() - torch.logdet(model.precision))
    assert gap > 0.3  # the posterior is strongly correlated: the two families are told apart
    full, diag = family("full_gaussian", 2), family("diag_gaussian", 2)
    full_elbo, full_stderr = model.elbo(full, fitted_params(model, full), samples=20_000, seed=15)
    diag_elbo, diag_stderr = model.elbo(diag, fitted_params(model, diag), samples=20_000, seed=15)
    assert model.log_evidence - full_elbo < 0.01 + 4 * full_stderr
    assert abs(model.log_evidence - diag_elbo - gap) < 0.01 + 4 * diag_stderr

    # And that gap is the optimum: the analytic mean-field solution attains it exactly.
    analytic = torch.cat([model.posterior_mean, -model.precision.diagonal().log()]).unsqueeze(0)
    analytic_elbo, analytic_stderr = model.elbo(diag, analytic, samples=20_000, seed=16)
    assert abs(model.log_evidence - analytic_elbo - gap) < 4 * analytic_stderr


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["planar", "iaf"])
@pytest.mark.parametrize("objective", [ELBO(), IWAE(k=3)], ids=["elbo", "iwae"])
def test_a_vae_with_a_flow_posterior_trains_a_step_on_binary_images(name: str, objective):
    torch.manual_seed(17)
    posterior = FAMILIES[name](4)
    encoder, decoder = build_mlp(
        (1, 8, 8), latent_dim=4, params_per_channel=1, hidden=[32], encoder_outputs=posterior.encoder_outputs
    )
    vae = VAE(encoder, decoder, Bernoulli(), latent_dim=4, posterior=posterior)
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.5))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in vae.posterior.parameters()]
    loss = objective.loss(vae(x, k=objective.latent_samples), progress=0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters() if p.requires_grad)
    assert all(p.grad.abs().sum() > 0 for p in vae.posterior.parameters())  # IAF's MADEs are trained with the model
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.posterior.parameters(), strict=True))
    assert torch.isfinite(objective.loss(vae(x, k=objective.latent_samples), progress=0.0))
