"""The math: closed-form KL, log-densities, the bounds and how they order, and units."""

import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal

from vaelab.likelihoods import Bernoulli
from vaelab.model import VAE
from vaelab.networks import build_mlp
from vaelab.objectives import (
    beta_vae_loss,
    bits_per_dim,
    gaussian_kl,
    gaussian_log_prob,
    iw_bound,
    kl_weight,
    standard_normal_log_prob,
)


def test_analytic_gaussian_kl_equals_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 3), torch.randn(5, 3)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(200_000, 5, 3)  # [S, B, D]
    log_ratio = gaussian_log_prob(z, mean, logvar) - standard_normal_log_prob(z)  # [S, B]
    mc, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    analytic = gaussian_kl(mean, logvar).sum(-1)
    assert torch.all((mc - analytic).abs() < 5 * stderr + 1e-4)


def test_log_densities_match_torch_distributions():
    torch.manual_seed(1)
    z, mean, logvar = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mean, logvar), expected)
    torch.testing.assert_close(standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_bernoulli_log_prob_is_a_log_likelihood_in_nats_per_image():
    torch.manual_seed(2)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.3))
    logits = torch.randn(3, 1, 4, 4) * 5
    ours = Bernoulli().log_prob(x, logits)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, TorchBernoulli(logits=logits).log_prob(x).flatten(1).sum(-1))
    assert torch.all(ours <= 0)


def test_beta_one_without_free_bits_is_minus_the_elbo():
    rec, kl_per_dim = torch.tensor([10.0, 20.0]), torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert beta_vae_loss(rec, kl_per_dim, weight=1.0).item() == pytest.approx(15.0 + 3.0)
    assert beta_vae_loss(rec, kl_per_dim, weight=4.0).item() == pytest.approx(15.0 + 12.0)


def test_free_bits_floor_each_dimensions_batch_mean_kl():
    rec = torch.zeros(2)
    kl_per_dim = torch.tensor([[0.1, 3.0], [0.3, 1.0]])  # batch means: 0.2 and 2.0
    assert beta_vae_loss(rec, kl_per_dim, weight=1.0, free_bits=0.5).item() == pytest.approx(0.5 + 2.0)


def test_kl_warmup_ramps_linearly_to_beta():
    assert kl_weight(2.0, 0, 0.0) == 2.0
    assert kl_weight(2.0, 4, 0.0) == 0.0
    assert kl_weight(2.0, 4, 1.0) == pytest.approx(0.5)
    assert kl_weight(2.0, 4, 10.0) == 2.0


def test_bits_per_dim_converts_nats_per_image():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_iw_bound_of_equal_weights_is_that_weight():
    log_w = torch.full((7, 3), -5.0)
    torch.testing.assert_close(iw_bound(log_w), torch.full((3,), -5.0))


@pytest.fixture
def random_vae():
    torch.manual_seed(3)
    encoder, decoder = build_mlp((1, 8, 8), latent_dim=4, params_per_channel=1, hidden=[32])
    return VAE(encoder, decoder, Bernoulli(), latent_dim=4).eval()


def test_shapes_of_a_k_sample_pass(random_vae):
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
    out = random_vae(x, k=3)
    assert out.z.shape == (3, 5, 4)
    assert out.log_px_z.shape == (3, 5)
    assert out.kl_per_dim.shape == (5, 4)
    assert out.log_weights.shape == (3, 5)
    assert out.elbo.shape == out.rec.shape == out.kl.shape == out.iw_bound.shape == (5,)
    assert torch.all(out.rec >= 0) and torch.all(out.kl >= 0)
    assert random_vae.sample(6).shape == (6, 1, 8, 8)
    assert random_vae.reconstruct(x).shape == x.shape


@torch.no_grad()
def test_iw_bound_is_above_the_elbo_and_tightens_as_k_grows(random_vae):
    """E[IWAE_k] is nondecreasing in k and IWAE_1 = ELBO (Burda et al.); checked with MC error bars."""
    torch.manual_seed(4)
    x = torch.bernoulli(torch.rand(400, 1, 8, 8))
    mean, logvar = random_vae.encode(x)
    elbo = random_vae.decode_pass(x, mean, logvar, k=1000).elbo  # [B], a low-noise ELBO estimate
    bounds = {}
    for k in (1, 10, 100, 1000):
        per_image = random_vae.decode_pass(x, mean, logvar, k=k).iw_bound
        bounds[k] = (per_image.mean().item(), per_image.std().item() / math.sqrt(len(x)))
    # k = 1 is an unbiased ELBO estimate
    assert abs(bounds[1][0] - elbo.mean().item()) < 4 * bounds[1][1]
    ks = sorted(bounds)
    for small, large in zip(ks[:-1], ks[1:], strict=True):
        assert bounds[large][0] > bounds[small][0] - 3 * (bounds[large][1] + bounds[small][1])
    assert bounds[1000][0] > elbo.mean().item()
