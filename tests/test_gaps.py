"""The inference gap split into approximation and amortization gaps, on a model whose posterior is known."""

import math

import pytest
import torch
from torch import nn

from vaelab.model.gaps import gap_split
from vaelab.model.posteriors import DiagonalGaussian, FullGaussian
from vaelab.model.priors import StandardNormal
from vaelab.model.vae import VAE

LATENT, OBSERVED, NOISE = 2, 4, 0.5


class LinearGaussianLikelihood(nn.Module):
    """p(x|z) = N(x; decoder(z), NOISE^2 I) over vectors x [B, OBSERVED]."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(params, NOISE).log_prob(x).sum(-1)


def linear_gaussian_vae(posterior, weight: torch.Tensor) -> VAE:
    """p(z) = N(0, I), p(x|z) = N(W z, NOISE^2 I), and a linear encoder that is deliberately off (random weights), so
    the amortization gap is not 0."""
    torch.manual_seed(0)
    decoder = nn.Linear(LATENT, OBSERVED, bias=False)
    with torch.no_grad():
        decoder.weight.copy_(weight)
    encoder = nn.Linear(OBSERVED, posterior.encoder_outputs)
    vae = VAE(encoder, decoder, LinearGaussianLikelihood(), LATENT, posterior=posterior, prior=StandardNormal(LATENT))
    return vae.double()


def exact_log_px(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    covariance = weight @ weight.T + NOISE**2 * torch.eye(OBSERVED, dtype=weight.dtype)
    return torch.distributions.MultivariateNormal(torch.zeros(OBSERVED, dtype=weight.dtype), covariance).log_prob(x)


def mean_field_shortfall(weight: torch.Tensor) -> float:
    """KL from the best diagonal Gaussian to the Gaussian posterior of precision Lambda = I + W^T W / s^2:
    1/2 (sum_i log Lambda_ii - log det Lambda), the same for every x."""
    precision = torch.eye(LATENT, dtype=weight.dtype) + weight.T @ weight / NOISE**2
    return 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()


CORRELATED = torch.tensor([[1.0, 0.9], [0.8, 1.0], [0.5, -0.3], [1.2, 0.7]], dtype=torch.float64)


@pytest.fixture(scope="module")
def observations() -> torch.Tensor:
    torch.manual_seed(1)
    z = torch.randn(12, LATENT, dtype=torch.float64)
    return z @ CORRELATED.T + NOISE * torch.randn(12, OBSERVED, dtype=torch.float64)


def split(posterior, x):
    torch.manual_seed(2)
    vae = linear_gaussian_vae(posterior, CORRELATED)
    # A random encoder starts far from q*, hence a larger learning rate than the default (made for trained encoders).
    return gap_split(vae, x, k=4000, steps=1000, samples=32, lr=0.1, tolerance=-1.0)  # all 1000 steps


def within_error(result, expected: float) -> bool:
    """The estimated approximation gap agrees with `expected` within 3 standard errors across images (log p(x) is
    an importance-weighted estimate, noisy where the proposal's tails are lighter than the posterior's)."""
    return abs(result.approximation.mean().item() - expected) < 3 * result.metrics()["test/approximation_gap_se"] + 0.01


def test_a_full_gaussian_has_no_approximation_gap_where_the_posterior_is_gaussian(observations):
    result = split(FullGaussian(LATENT), observations)
    exact = exact_log_px(observations, CORRELATED)
    # q* is the posterior itself: every importance weight is p(x), and ELBO(q*) = log p(x)
    torch.testing.assert_close(result.log_px_refined, exact, atol=0.005, rtol=0)
    assert (exact - result.elbo_refined).abs().mean().item() < 0.02
    assert within_error(result, 0.0)


def test_a_diagonal_gaussian_falls_short_by_the_closed_form_mean_field_gap(observations):
    result = split(DiagonalGaussian(LATENT), observations)
    expected = mean_field_shortfall(CORRELATED)
    assert expected > 0.3  # correlated enough for the check to mean something
    exact = exact_log_px(observations, CORRELATED)
    assert (exact - result.elbo_refined).mean().item() == pytest.approx(expected, abs=0.02)  # q* is the best diagonal
    assert within_error(result, expected)


@pytest.mark.parametrize("posterior", [DiagonalGaussian(LATENT), FullGaussian(LATENT)], ids=["diag", "full"])
def test_refining_the_encoders_q_never_lowers_the_elbo_and_the_gaps_add_up(posterior, observations):
    result = split(posterior, observations)
    amortization, approximation = result.amortization, result.approximation
    assert amortization.mean().item() > 0.1  # the random encoder is far from q*
    # on every image, within Monte-Carlo error (k = 4000 fresh samples for each ELBO)
    assert (amortization > -0.02).all() and (approximation > -0.05).all()
    total = (result.log_px - result.elbo_encoder).mean().item()
    assert total == pytest.approx(amortization.mean().item() + approximation.mean().item(), abs=1e-9)
    assert math.isfinite(result.metrics()["test/approximation_gap_se"])


@pytest.mark.integration
def test_the_evaluate_stage_splits_the_gap_into_the_trained_run_when_asked(project, capsys):
    from helpers.config import TINY, make_config
    from helpers.stores import mlflow_client
    from vaelab.stages.evaluate import evaluate
    from vaelab.stages.train import train

    run_id = train(make_config(*TINY))["run_id"]
    asked = ["eval.gaps=true", "eval.gaps_limit=30", "eval.gaps_steps=100", f"run_id={run_id}"]
    metrics = evaluate(make_config(*TINY, *asked))
    logged = mlflow_client(project).get_run(run_id).data.metrics
    for name in ("approximation_gap", "approximation_gap_se", "amortization_gap", "amortization_gap_se"):
        assert logged[f"test/{name}"] == pytest.approx(metrics[f"test/{name}"])
    assert metrics["test/gaps_n_images"] == 30
    assert metrics["test/amortization_gap"] > -3 * metrics["test/amortization_gap_se"]
    assert metrics["test/approximation_gap"] > -3 * metrics["test/approximation_gap_se"]
    assert "inference gap on 30 test images" in capsys.readouterr().out
    assert "test/approximation_gap" not in evaluate(make_config(*TINY, f"run_id={run_id}"))  # only when asked
