"""Held-out estimators: the IW bound, its chunking, ESS, standard errors, active units, mutual information, and the
warnings of a collapsed posterior and of a mutual information saturated at log N."""

import math

import pytest
import torch

from vaelab.model.distributions import gaussian_log_prob, standard_normal_log_prob
from vaelab.model.estimators import active_units, evaluate_images, iw_batch, mutual_information
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.networks import build_mlp
from vaelab.model.vae import VAE
from vaelab.stages.evaluate import MI_SATURATION_MARGIN, warn_if_saturated


def digits_vae(seed: int = 0, latent_dim: int = 4) -> VAE:
    torch.manual_seed(seed)
    encoder, decoder = build_mlp((1, 8, 8), latent_dim=latent_dim, params_per_channel=1, hidden=[32])
    return VAE(encoder, decoder, Bernoulli(), latent_dim=latent_dim).eval()


def binary_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))


def sharp_digits_vae(latent_dim: int = 4) -> VAE:
    """Posterior means far apart and variances tiny: no two images' posteriors overlap."""
    vae = digits_vae(latent_dim=latent_dim)
    head = vae.encoder.net[-1]  # its outputs are (mean, logvar)
    with torch.no_grad():
        head.weight[:latent_dim] *= 100.0
        head.weight[latent_dim:] = 0.0
        head.bias[latent_dim:] = -10.0
    return vae


class TagRecorder:
    """Stands in for a tracked run: keeps the tags set on it."""

    def __init__(self):
        self.tags: dict[str, str] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def test_iwae_with_one_sample_equals_the_elbo_with_a_monte_carlo_kl_on_the_same_noise():
    vae, x = digits_vae(), binary_images(50)
    out = vae(x, k=1)
    z = out.z[0]
    mc_kl = gaussian_log_prob(z, out.q.mean, out.q.logvar) - standard_normal_log_prob(z)
    torch.testing.assert_close(out.iw_bound, out.log_px_z[0] - mc_kl)


def test_the_nll_estimate_does_not_depend_on_the_chunk_size():
    """Chunking changes which noise each sample gets, so the two agree within Monte-Carlo error:
    the mean per-image difference is within 4 standard errors of that difference."""
    vae, x = digits_vae(), binary_images(300)
    torch.manual_seed(2)
    one_at_a_time = iw_batch(vae, x, k=64, rows=len(x))  # chunks of 1 sample
    torch.manual_seed(3)
    all_at_once = iw_batch(vae, x, k=64, rows=64 * len(x))
    diff = one_at_a_time["log_px"] - all_at_once["log_px"]
    assert diff.abs().max() > 0  # different noise really was used
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff))
    torch.testing.assert_close(one_at_a_time["kl_per_dim"], all_at_once["kl_per_dim"])  # closed form


def test_with_the_exact_posterior_the_bound_is_tight_and_every_weight_counts():
    """All weights zero: q(z|x) = N(0, I) = p(z) = p(z|x), since the decoder ignores z. Then every
    importance weight is the same, log p(x) is exact for any k, the gap is 0 and the ESS is k."""
    vae = digits_vae()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
    result = evaluate_images(vae, binary_images(40), k=16)
    assert result.nll_iw == pytest.approx(64 * math.log(2), rel=1e-5)  # each pixel: Bernoulli(1/2)
    assert result.inference_gap == pytest.approx(0.0, abs=1e-4)
    assert result.iw_ess == pytest.approx(16.0, rel=1e-5)
    assert result.active_units == 0
    assert "posterior collapse: only 0 of 4" in result.collapse_warning()


def test_a_trained_looking_model_reports_standard_errors_and_an_ess_below_k():
    result = evaluate_images(digits_vae(), binary_images(200), k=32)
    assert result.nll_iw_se > 0 and result.elbo_se > 0
    assert 1.0 <= result.iw_ess < 32.0
    assert result.nll_iw <= -result.elbo + 1e-6
    metrics = result.metrics("test")
    assert {"test/nll_iw_se", "test/elbo_se", "test/iw_ess", "test/inference_gap"} <= set(metrics)


def test_active_units_count_dimensions_whose_posterior_mean_varies_across_images():
    torch.manual_seed(3)
    means = torch.stack(
        [torch.randn(5000), 0.05 * torch.randn(5000), 0.2 * torch.randn(5000), torch.full((5000,), 3.0)], dim=1
    )  # variances: 1, 0.0025, 0.04, 0
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3


def test_mutual_information_is_zero_for_one_shared_posterior_and_log_n_for_separate_ones():
    n, d = 50, 3
    shared = mutual_information(torch.zeros(n, d), torch.zeros(n, d))
    assert shared == pytest.approx(0.0, abs=1e-12)
    apart = mutual_information(100.0 * torch.arange(n, dtype=torch.float64)[:, None].expand(n, d), torch.zeros(n, d))
    assert apart == pytest.approx(math.log(n), abs=1e-9)
    halves = torch.cat([torch.full((n // 2, d), -100.0), torch.full((n // 2, d), 100.0)])
    assert mutual_information(halves, torch.zeros(n, d)) == pytest.approx(math.log(2), abs=1e-9)  # one bit
    chunked = mutual_information(halves, torch.zeros(n, d), chunk=7)
    assert chunked == pytest.approx(mutual_information(halves, torch.zeros(n, d)))


def test_mutual_information_matches_the_pairwise_densities_computed_directly():
    gen = torch.Generator().manual_seed(9)
    mean, logvar = torch.randn(40, 3, generator=gen), 0.5 * torch.randn(40, 3, generator=gen) - 1
    z = mean.double() + torch.exp(0.5 * logvar.double()) * torch.randn(
        mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    pairs = gaussian_log_prob(z[:, None], mean.double()[None], logvar.double()[None])  # [n, m]
    direct = (pairs.diagonal() - (torch.logsumexp(pairs, 1) - math.log(40))).mean().item()
    assert mutual_information(mean, logvar, seed=0, chunk=16) == pytest.approx(direct, rel=1e-9)


def test_the_estimators_agree_with_an_independent_float64_implementation_on_the_same_latents():
    """nll_iw, the ELBO terms and the ESS as torch.distributions writes them, in float64, with the latents the
    estimator draws (one chunk, so one draw of noise [k, B, D] after the same seed)."""
    from torch.distributions import Bernoulli as TorchBernoulli
    from torch.distributions import Normal, kl_divergence

    vae, x, k = digits_vae(seed=4).double(), binary_images(24, seed=5).double(), 50
    torch.manual_seed(6)
    result = evaluate_images(vae, x, k=k)

    torch.manual_seed(6)
    with torch.no_grad():
        params = vae.encoder(x)
        mean, logvar = params[:, :4], params[:, 4:].clamp(-12.0, 8.0)
        q = Normal(mean, torch.exp(0.5 * logvar))
        z = mean + q.scale * torch.randn((k, *mean.shape), dtype=torch.float64)  # [k, B, D]
        log_px_z = TorchBernoulli(logits=vae.decoder(z)).log_prob(x).sum((-3, -2, -1))  # [k, B]
        log_w = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        log_px = torch.logsumexp(log_w, 0) - math.log(k)
        weights = torch.softmax(log_w, 0)
        kl = kl_divergence(q, Normal(0.0, 1.0))  # [B, D]
        elbo = log_px_z.mean(0) - kl.sum(-1)

    assert result.nll_iw == pytest.approx(-log_px.mean().item(), abs=1e-4)
    assert result.nll_iw_se == pytest.approx((log_px.std() / math.sqrt(len(x))).item(), abs=1e-4)
    assert result.elbo == pytest.approx(elbo.mean().item(), abs=1e-4)
    assert result.rec == pytest.approx(-log_px_z.mean().item(), abs=1e-4)
    assert result.kl == pytest.approx(kl.sum(-1).mean().item(), abs=1e-6)
    assert result.kl_per_dim == pytest.approx(kl.mean(0).tolist(), abs=1e-6)
    assert result.iw_ess == pytest.approx((1 / weights.pow(2).sum(0)).mean().item(), rel=1e-4)


def test_the_evaluation_reports_log_n_as_the_most_its_mutual_information_can_be():
    result = evaluate_images(sharp_digits_vae(), binary_images(8), k=4)
    assert result.metrics("test")["test/mutual_info_max"] == pytest.approx(math.log(8))
    assert result.mutual_info <= result.mutual_info_max + 1e-9


def test_a_mutual_information_within_half_a_nat_of_log_n_is_told_once_and_tagged_as_saturated(capsys):
    """With 8 images whose posteriors do not overlap, the estimate is log 8 whatever the code says about x."""
    result = evaluate_images(sharp_digits_vae(), binary_images(8), k=4)
    assert result.mutual_info_max - result.mutual_info < MI_SATURATION_MARGIN
    run = TagRecorder()
    warn_if_saturated(result, run)
    sentence = run.tags["vaelab.mi_saturated"]
    assert f"mutual_info {result.mutual_info:.2f} is within 0.5 nats of its maximum log N = 2.08 (N = 8)" in sentence
    assert capsys.readouterr().out.splitlines() == [f"vaelab: warning: {sentence}"]


def test_a_mutual_information_well_below_log_n_sets_no_tag_and_prints_nothing(capsys):
    vae = digits_vae()
    with torch.no_grad():
        for parameter in vae.encoder.parameters():
            parameter.zero_()  # every image gets q(z|x) = N(0, I): the code says nothing about x
    result = evaluate_images(vae, binary_images(8), k=4)
    assert result.mutual_info == pytest.approx(0.0, abs=1e-9)
    run = TagRecorder()
    warn_if_saturated(result, run)
    assert run.tags == {}
    assert capsys.readouterr().out == ""


MEMORY_PROBE = """
import torch
from vaelab.model.estimators import evaluate_images
from vaelab.training.builder import build_vae

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

torch.manual_seed(0)
arch = {"_target_": "vaelab.model.networks.build_mlp", "hidden": [64]}
prior = {"_target_": "vaelab.model.mixture_priors.VampPrior", "components": 100}
vae = build_vae([1, 28, 28], arch, {"_target_": "vaelab.model.likelihoods.Bernoulli"}, 16, prior=prior).eval()
images = (torch.rand(200, 1, 28, 28) > 0.5).float()
evaluate_images(vae, images[:8], k=1000)
before = resident_mb()
evaluate_images(vae, images, k=1000)
print(resident_mb() - before)
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_evaluating_more_images_takes_no_more_memory_than_a_few_batches():
    # Each batch's temporaries are ~25 MB here (k x images x 100 mixture components x 16 dimensions); a process that
    # kept memory per batch would grow by about that for each of the 50 batches of 4 images.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) < 300
