"""The learned mixture priors: exact densities that integrate to one, draws from the same mixture, a VampPrior that
scores latents through its VAE's encoder without owning it, and a VAE that trains with either."""

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vaelab.model import mixture_priors
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.mixture_priors import MixtureOfGaussians, VampPrior
from vaelab.model.networks import build_mlp
from vaelab.model.posteriors import DiagonalGaussian, FullGaussian
from vaelab.model.vae import VAE
from vaelab.training.builder import build_vae

IMAGE = (1, 8, 8)
KINDS = ["mog", "vamp"]


def vamp_vae(latent_dim: int = 3, components: int = 4, posterior=None, seed: int = 0) -> VAE:
    """A small float64 VAE whose prior is a VampPrior (the VAE binds it). The pseudo-inputs are spread over the input
    range and the encoder's output layer scaled up, so that the components differ in means and variances (a fresh
    model's are close together)."""
    torch.manual_seed(seed)
    posterior = posterior or DiagonalGaussian(latent_dim)
    encoder, decoder = build_mlp(IMAGE, latent_dim, 1, [16], encoder_outputs=posterior.encoder_outputs)
    prior = VampPrior(latent_dim, components, IMAGE)
    with torch.no_grad():
        prior.raw_pseudo_inputs.normal_(0.0, 3.0)
        encoder.net[-1].weight.mul_(8.0)
    return VAE(encoder, decoder, Bernoulli(), latent_dim, posterior=posterior, prior=prior).double()


def random_mog(latent_dim: int = 3, components: int = 4, seed: int = 0) -> MixtureOfGaussians:
    """A float64 mixture with unequal weights and variances (not its starting values)."""
    torch.manual_seed(seed)
    prior = MixtureOfGaussians(latent_dim, components).double()
    with torch.no_grad():
        prior.logits.normal_()
        prior.raw_logvars.uniform_(-1.0, 0.5)
    return prior


def mixture_parameters(prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [K], means [K, D], stds [K, D]) of the mixture the prior should be, found through public attributes."""
    if isinstance(prior, MixtureOfGaussians):
        return prior.logits, prior.means, torch.exp(0.5 * prior.logvars)
    vae = prior.__dict__["_vae"]
    q = vae.posterior(vae.encoder(prior.pseudo_inputs))
    return torch.zeros(len(q.mean), dtype=q.mean.dtype), q.mean, torch.exp(0.5 * q.logvar)


def reference(prior) -> MixtureSameFamily:
    """torch.distributions' mixture of diagonal Gaussians with the prior's parameters."""
    logits, means, stds = mixture_parameters(prior)
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, stds), 1))


def marginal_reference(prior, d: int) -> MixtureSameFamily:
    logits, means, stds = mixture_parameters(prior)
    return MixtureSameFamily(Categorical(logits=logits), Normal(means[:, d], stds[:, d]))


def make_prior(kind: str, latent_dim: int = 3, components: int = 4, seed: int = 0):
    return (
        random_mog(latent_dim, components, seed) if kind == "mog" else vamp_vae(latent_dim, components, seed=seed).prior
    )


# -- densities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_log_prob_and_each_marginal_match_torch_mixtures_of_gaussians(kind: str):
    prior = make_prior(kind)
    z = 2 * torch.randn(5, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(prior.log_prob(z), reference(prior).log_prob(z))
    marginals = prior.marginal_log_prob(z)
    assert marginals.shape == z.shape
    for d in range(3):
        torch.testing.assert_close(marginals[..., d], marginal_reference(prior, d).log_prob(z[..., d]))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_densities_of_many_latents_are_computed_in_chunks_with_the_same_values(kind: str, monkeypatch):
    prior = make_prior(kind)
    z = torch.randn(4, 9, 3, dtype=torch.float64)
    whole, marginals = prior.log_prob(z), prior.marginal_log_prob(z)
    monkeypatch.setattr(mixture_priors, "TABLE_ELEMENTS", 5 * 4 * 3)  # five rows of [K=4, D=3] a chunk
    torch.testing.assert_close(prior.log_prob(z), whole)
    torch.testing.assert_close(prior.marginal_log_prob(z), marginals)


def grid_over(prior, points: int) -> torch.Tensor:
    """`points` equally spaced values covering every component to 9 standard deviations, [points]."""
    _, means, stds = mixture_parameters(prior)
    reach = (means.abs() + 9 * stds).max().item()
    return torch.linspace(-reach, reach, points, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_the_density_integrates_to_one_in_one_dimension(kind: str):
    prior = make_prior(kind, latent_dim=1)
    z = grid_over(prior, 20_001)
    density = prior.log_prob(z.unsqueeze(-1)).exp()
    assert torch.trapezoid(density, z).item() == pytest.approx(1.0, abs=1e-3)
    marginal = prior.marginal_log_prob(z.unsqueeze(-1)).squeeze(-1).exp()
    assert torch.trapezoid(marginal, z).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_the_density_integrates_to_one_in_two_dimensions_and_to_its_marginals_over_one(kind: str):
    prior = make_prior(kind, latent_dim=2)
    axis = grid_over(prior, 601)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)  # [601, 601, 2]: z[i, j] = (axis_i, axis_j)
    density = prior.log_prob(z).exp()  # [601, 601]
    assert torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis).item() == pytest.approx(1.0, abs=1e-3)
    marginals = prior.marginal_log_prob(z).exp()  # [601, 601, 2]
    first, second = torch.trapezoid(density, axis, dim=1), torch.trapezoid(density, axis, dim=0)
    torch.testing.assert_close(first, marginals[:, 0, 0], atol=1e-3 * first.max().item(), rtol=0)
    torch.testing.assert_close(second, marginals[0, :, 1], atol=1e-3 * second.max().item(), rtol=0)


# -- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_draws_have_the_shape_and_moments_of_the_mixture_and_repeat_for_a_seed(kind: str):
    prior = make_prior(kind)
    n = 40_000
    draws = prior.sample(n, torch.Generator().manual_seed(7))
    assert draws.shape == (n, 3) and draws.dtype == torch.float64
    torch.testing.assert_close(prior.sample(n, torch.Generator().manual_seed(7)), draws)
    assert not torch.equal(prior.sample(n, torch.Generator().manual_seed(8)), draws)
    mixture = reference(prior)
    standard_error = (mixture.variance / n).sqrt()
    assert torch.all((draws.mean(0) - mixture.mean).abs() < 4 * standard_error)
    # The variance of a sample variance is about 2 var^2 / n for a Gaussian; a mixture's tails add a little.
    assert torch.all((draws.var(0) / mixture.variance - 1).abs() < 6 * (2 / n) ** 0.5)


def test_a_mixture_draws_its_components_by_their_weights():
    prior = random_mog(latent_dim=1, components=2)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 3.0]))  # weights 1 / (1 + e^3) ~ 0.047 and ~ 0.953
        prior.means.copy_(torch.tensor([[-50.0], [50.0]]))
        draws = prior.sample(20_000, torch.Generator().manual_seed(0))
    first = (draws < 0).double().mean().item()
    weight = torch.sigmoid(torch.tensor(-3.0)).item()
    assert first == pytest.approx(weight, abs=4 * (weight * (1 - weight) / 20_000) ** 0.5)


def test_a_mixture_starts_with_equal_weights_unit_variances_and_distinct_means():
    prior = MixtureOfGaussians(latent_dim=3, components=5)
    torch.testing.assert_close(prior.log_weights.exp(), torch.full((5,), 0.2))
    torch.testing.assert_close(prior.logvars, torch.zeros(5, 3))
    assert torch.cdist(prior.means, prior.means).add(torch.eye(5)).min() > 0


# -- the VampPrior and its VAE ------------------------------------------------------------------


def test_a_vamp_prior_builds_without_a_vae_and_refuses_to_score_until_bound():
    prior = VampPrior(latent_dim=4, components=3, image_shape=IMAGE)
    assert prior.pseudo_inputs.shape == (3, *IMAGE)
    with pytest.raises(RuntimeError, match="not bound to a VAE"):
        prior.log_prob(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="not bound to a VAE"):
        prior.sample(2)
    with pytest.raises(ValueError, match="image_shape"):
        VampPrior(latent_dim=4, components=3)


def test_pseudo_inputs_stay_in_the_encoders_input_range_and_start_near_its_middle_all_different():
    prior = VampPrior(latent_dim=2, components=50, image_shape=IMAGE)
    u = prior.pseudo_inputs
    assert (u - 0.5).abs().max() < 0.15
    assert torch.unique(u.flatten(1), dim=0).shape[0] == 50
    with torch.no_grad():
        prior.raw_pseudo_inputs.mul_(1000.0)  # however far training pushes the free parameter
    assert prior.pseudo_inputs.min() >= 0 and prior.pseudo_inputs.max() <= 1


def test_the_vamp_prior_follows_the_encoder():
    vae = vamp_vae()
    z = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        before = vae.prior.log_prob(z)
        vae.encoder.net[0].weight.add_(0.5)
        after = vae.prior.log_prob(z)
    assert (after - before).abs().min() > 1e-6


def test_the_vamp_prior_reads_the_encoder_each_time_it_scores_so_a_replaced_encoder_is_used():
    vae = vamp_vae()
    calls = []
    original = vae.encoder
    vae.encoder = torch.nn.Sequential()  # forward hooks see each call of the replacement
    vae.encoder.append(original)
    vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    vae.prior.log_prob(torch.zeros(2, 3, dtype=torch.float64))
    vae.prior.sample(2)
    assert calls == [(4, *IMAGE), (4, *IMAGE)]


def test_log_p_z_sends_gradients_to_the_pseudo_inputs_and_the_encoder():
    vae = vamp_vae()
    vae.prior.log_prob(torch.randn(6, 3, dtype=torch.float64)).sum().backward()
    assert vae.prior.raw_pseudo_inputs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())


def test_the_vamp_prior_holds_its_pseudo_inputs_once_and_not_the_encoder():
    vae = vamp_vae()
    assert list(vae.prior.state_dict()) == ["raw_pseudo_inputs"]
    assert [key for key in vae.state_dict() if "pseudo" in key] == ["prior.raw_pseudo_inputs"]
    assert not any(key.startswith("prior.") and "encoder" in key for key in vae.state_dict())
    assert vae not in list(vae.prior.modules())
    modules = list(vae.modules())
    assert len(modules) == len({id(m) for m in modules})  # each module once: no cycle through the prior
    assert len(list(vae.parameters())) == len(vae.state_dict())


def test_a_vae_with_a_vamp_prior_survives_a_state_dict_round_trip():
    trained, fresh = vamp_vae(seed=0), vamp_vae(seed=1)
    z = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(fresh.prior.log_prob(z), trained.prior.log_prob(z))
        fresh.load_state_dict(trained.state_dict())
        torch.testing.assert_close(fresh.prior.log_prob(z), trained.prior.log_prob(z))


@torch.no_grad()
def test_a_vamp_prior_over_a_richer_family_is_the_mixture_of_its_base_gaussians():
    vae = vamp_vae(posterior=FullGaussian(3))
    base = vae.encode(vae.prior.pseudo_inputs)
    z = torch.randn(6, 3, dtype=torch.float64)
    expected = MixtureSameFamily(
        Categorical(logits=torch.zeros(4, dtype=torch.float64)),
        Independent(Normal(base.mean, torch.exp(0.5 * base.logvar)), 1),
    )
    torch.testing.assert_close(vae.prior.log_prob(z), expected.log_prob(z))


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prior",
    [
        {"_target_": "vaelab.model.mixture_priors.MixtureOfGaussians", "components": 3},
        {"_target_": "vaelab.model.mixture_priors.VampPrior", "components": 3},
    ],
    ids=KINDS,
)
def test_a_vae_with_a_learned_prior_trains_a_step_and_its_prior_learns(prior: dict):
    torch.manual_seed(0)
    arch = {"_target_": "vaelab.model.networks.build_mlp", "hidden": [16]}
    likelihood = {"_target_": "vaelab.model.likelihoods.Bernoulli"}
    vae = build_vae(list(IMAGE), arch, likelihood, latent_dim=2, prior=prior)
    x = torch.bernoulli(torch.full((8, *IMAGE), 0.5))
    out = vae(x, k=2)
    assert out.kl_per_dim.shape == (8, 2) and torch.isfinite(out.kl_per_dim).all()
    loss = -out.elbo.mean()
    assert torch.isfinite(loss)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    optimizer.zero_grad()
    loss.backward()
    before = {name: p.detach().clone() for name, p in vae.prior.named_parameters()}
    assert before
    for name, p in vae.prior.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in vae.prior.named_parameters())
    assert torch.isfinite(vae(x, k=2).elbo).all()
    assert vae.sample(5, torch.Generator().manual_seed(0)).shape == (5, *IMAGE)
