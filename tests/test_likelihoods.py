"""Likelihoods: true log-probabilities of the discrete data, in nats per image, summed over pixels."""

import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from helpers.config import TINY, make_config
from helpers.stores import all_runs
from vaelab.model.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian
from vaelab.stages.train import train


@pytest.mark.parametrize("levels", [17, 256])
def test_the_discretized_logistic_puts_probability_one_on_the_grey_levels(levels: int):
    torch.manual_seed(0)
    likelihood = DiscretizedLogistic(grey_levels=levels)
    # float64, so the check is of the formula, not of float32 rounding over 256 terms
    params = torch.cat([torch.rand(5, 1, 1, 1) * 1.4 - 0.2, torch.randn(5, 1, 1, 1) * 2 - 3], dim=1).double()
    every_level = torch.arange(levels).double().view(levels, 1, 1, 1, 1) / (levels - 1)  # [L, 1, 1, 1, 1]
    log_p = likelihood.log_prob(every_level, params.expand(levels, -1, -1, -1, -1))  # [L, 5]
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_discretized_logistic_matches_the_cdf_difference_and_stays_finite():
    likelihood = DiscretizedLogistic(grey_levels=256)
    x = torch.tensor([0.0, 100.0, 255.0]).view(3, 1, 1, 1) / 255
    loc, log_scale = torch.full((3, 1, 1, 1), 0.4), torch.full((3, 1, 1, 1), -2.0)
    params = torch.cat([loc, log_scale], dim=1).requires_grad_()
    s, h = math.exp(-2.0), 0.5 / 255
    cdf = lambda v: torch.sigmoid((v - 0.4) / s)  # noqa: E731
    expected = torch.stack([cdf(x[0] + h), cdf(x[1] + h) - cdf(x[1] - h), 1 - cdf(x[2] - h)]).log().flatten()
    log_p = likelihood.log_prob(x, params)
    torch.testing.assert_close(log_p, expected, rtol=1e-4, atol=1e-5)
    far = likelihood.log_prob(x, torch.cat([torch.full_like(loc, 50.0), torch.full_like(log_scale, -7.0)], dim=1))
    assert torch.isfinite(far).all()  # the CDF difference underflows in float32, its log must not
    log_p.sum().backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize("variance", ["pixel", "global"])
def test_the_gaussian_is_a_normal_density_on_dequantized_data_minus_the_bin_volume(variance: str):
    torch.manual_seed(1)
    likelihood = Gaussian(grey_levels=256, variance=variance, min_std=1e-3)
    y = Gaussian.observe(torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8), 256)
    params = torch.randn(4, likelihood.params_per_channel, 3, 3)
    mu = params[:, :1]
    raw = params[:, 1:] if variance == "pixel" else likelihood.raw_std
    std = 1e-3 + torch.nn.functional.softplus(raw)
    expected = Normal(mu, std).log_prob(y).flatten(1).sum(-1) - 9 * math.log(256)
    torch.testing.assert_close(likelihood.log_prob(y, params), expected)


def test_the_gaussian_sigma_never_goes_below_its_floor():
    likelihood = Gaussian(grey_levels=256, min_std=0.01)
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -1e4)], dim=1)
    _, std = likelihood._mean_std(params)
    assert torch.all(std >= 0.01)
    assert torch.isfinite(likelihood.log_prob(torch.zeros(1, 1, 2, 2), params)).all()


def test_observations_dequantize_within_the_bin_and_fixed_ones_repeat():
    images = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    y = Gaussian.observe(images, 256)
    assert torch.all(y >= images / 256) and torch.all(y < (images.float() + 1) / 256)
    split = {"images": images, "binary": torch.zeros_like(images)}
    torch.testing.assert_close(Gaussian.observe_fixed(split, 256, seed=3), Gaussian.observe_fixed(split, 256, seed=3))
    assert not torch.equal(Gaussian.observe_fixed(split, 256, seed=3), Gaussian.observe_fixed(split, 256, seed=4))
    assert torch.equal(Bernoulli.observe_fixed(split, 256, seed=3), split["binary"].float())  # stored by prepare
    assert torch.equal(DiscretizedLogistic.observe(images, 256), images / 255)


@pytest.mark.integration
@pytest.mark.parametrize("likelihood", ["gaussian", "logistic"])
def test_each_likelihood_trains_and_reports_8bit_nats(project: Path, likelihood: str):
    summary = train(make_config(*TINY, f"likelihood={likelihood}", "trainer.max_epochs=1"))
    [run] = all_runs(project)
    assert run.info.status == "FINISHED"
    assert run.data.tags["vaelab.representation"] == "8bit"
    # digits have 17 grey levels: a uniform model costs 64 ln 17 = 181 nats; a model must be finite and not absurd
    assert math.isfinite(summary["val/elbo"]) and math.isfinite(summary["val/nll_iw"])
    assert summary["val/nll_iw"] < 64 * math.log(17) * 1.5
