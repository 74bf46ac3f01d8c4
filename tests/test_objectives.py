"""The math: closed-form KL, log-densities, the bounds and how they order, and units."""

import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal

from vaelab.model.distributions import gaussian_kl, gaussian_log_prob, standard_normal_log_prob
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.networks import build_mlp
from vaelab.model.objectives import beta_vae_loss, bits_per_dim, capacity_loss, iw_bound, linear_ramp
from vaelab.model.vae import VAE


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
    assert linear_ramp(2.0, 0, 0.0) == 2.0
    assert linear_ramp(2.0, 4, 0.0) == 0.0
    assert linear_ramp(2.0, 4, 1.0) == pytest.approx(0.5)
    assert linear_ramp(2.0, 4, 10.0) == 2.0


def test_capacity_loss_holds_the_kl_at_the_target_from_either_side():
    rec, kl = torch.tensor([10.0, 20.0]), torch.tensor([4.0, 8.0])  # mean rec 15, mean KL 6
    assert capacity_loss(rec, kl, gamma=100.0, capacity=6.0).item() == pytest.approx(15.0)
    assert capacity_loss(rec, kl, gamma=100.0, capacity=2.0).item() == pytest.approx(15.0 + 400.0)
    assert capacity_loss(rec, kl, gamma=100.0, capacity=10.0).item() == pytest.approx(15.0 + 400.0)
    assert linear_ramp(25.0, 10, 5.0) == pytest.approx(12.5)  # C halfway up its ramp


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
    q = random_vae.encode(x)
    elbo = random_vae.decode_pass(x, q, k=1000).elbo  # [B], a low-noise ELBO estimate
    bounds = {}
    for k in (1, 10, 100, 1000):
        per_image = random_vae.decode_pass(x, q, k=k).iw_bound
        bounds[k] = (per_image.mean().item(), per_image.std().item() / math.sqrt(len(x)))
    # k = 1 is an unbiased ELBO estimate
    assert abs(bounds[1][0] - elbo.mean().item()) < 4 * bounds[1][1]
    ks = sorted(bounds)
    for small, large in zip(ks[:-1], ks[1:], strict=True):
        assert bounds[large][0] > bounds[small][0] - 3 * (bounds[large][1] + bounds[small][1])
    assert bounds[1000][0] > elbo.mean().item()


def encoder_and_decoder_grads(vae: VAE, x: torch.Tensor, k: int, dreg: bool, seed: int):
    vae.zero_grad()
    torch.manual_seed(seed)
    out = vae(x, k=k)
    bound = out.dreg_iw_bound if dreg else out.iw_bound
    (-bound.mean()).backward()
    flat = lambda module: torch.cat([p.grad.flatten() for p in module.parameters()])  # noqa: E731
    return bound.detach(), flat(vae.encoder), flat(vae.decoder)


def test_dreg_keeps_the_iwae_value_and_decoder_gradient_and_changes_only_the_encoders(random_vae):
    x = torch.bernoulli(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(5)))
    value, enc, dec = encoder_and_decoder_grads(random_vae, x, k=8, dreg=False, seed=6)
    dreg_value, dreg_enc, dreg_dec = encoder_and_decoder_grads(random_vae, x, k=8, dreg=True, seed=6)
    torch.testing.assert_close(dreg_value, value)
    torch.testing.assert_close(dreg_dec, dec)
    assert not torch.allclose(dreg_enc, enc)


def test_dreg_encoder_gradient_vanishes_at_the_exact_posterior(random_vae):
    """Zero weights: q(z|x) = N(0, I) = p(z|x), since the decoder ignores z. log w is then constant in z,
    so DReG's encoder gradient is exactly 0, while the standard IWAE estimator's score term is not."""
    with torch.no_grad():
        for parameter in random_vae.parameters():
            parameter.zero_()
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.5))
    _, enc, _ = encoder_and_decoder_grads(random_vae, x, k=8, dreg=False, seed=7)
    _, dreg_enc, _ = encoder_and_decoder_grads(random_vae, x, k=8, dreg=True, seed=7)
    assert enc.abs().max() > 1e-3
    assert dreg_enc.abs().max() == 0


def test_dreg_encoder_gradient_has_the_iwae_expectation(random_vae):
    """Both estimators are unbiased for the same gradient: their means over repeats agree within MC error."""
    x = torch.bernoulli(torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(8)))
    draws = {
        dreg: torch.stack([encoder_and_decoder_grads(random_vae, x, k=16, dreg=dreg, seed=s)[1] for s in range(40)])
        for dreg in (False, True)
    }
    mean = {dreg: g.mean(0) for dreg, g in draws.items()}
    se = {dreg: g.std(0) / math.sqrt(len(g)) for dreg, g in draws.items()}
    z_scores = (mean[True] - mean[False]) / torch.sqrt(se[True] ** 2 + se[False] ** 2 + 1e-12)
    assert z_scores.abs().max() < 5  # ~thousands of parameters: a 5-sigma bound holds for every one
    assert (draws[True].var(0).sum() < draws[False].var(0).sum()).item()  # and with less noise


def test_reading_the_dreg_bound_twice_weights_the_encoder_gradient_as_reading_it_once(random_vae):
    """DReG re-weights the gradient reaching z; a second re-weighting would square the weights. A pass computes the
    bound once, so a loss that reads it twice gets the gradient of the same bound counted twice, nothing else."""
    x = torch.bernoulli(torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(9)))
    _, once, _ = encoder_and_decoder_grads(random_vae, x, k=8, dreg=True, seed=10)
    random_vae.zero_grad()
    torch.manual_seed(10)
    out = random_vae(x, k=8)
    (-(out.dreg_iw_bound.mean() + out.dreg_iw_bound.mean()) / 2).backward()
    twice = torch.cat([p.grad.flatten() for p in random_vae.encoder.parameters()])
    torch.testing.assert_close(twice, once)
