"""arch=mlp2: two stochastic layers, p(z2) p(z1|z2) p(x|z1) and q(z1|x) q(z2|z1), whose latent is the joint
z = (z1, z2). Its bounds are the joint ones, its code is z1, and it goes through the whole pipeline."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from helpers.config import TINY, make_config
from helpers.processes import run_entry
from helpers.stores import all_runs, mlflow_client
from vaelab.config import validate
from vaelab.model.gaps import gap_split
from vaelab.training.builder import build_vae

Z1, Z2 = 3, 2
ARCH = {
    "_target_": "vaelab.model.hierarchy.build_mlp2",
    "latent_dims": [Z1, Z2],
    "hidden": [8],
    "top_hidden": [6],
    "activation": "tanh",
}
BERNOULLI = {"_target_": "vaelab.model.likelihoods.Bernoulli"}


def tiny_vae(seed: int = 0, **components):
    torch.manual_seed(seed)
    return build_vae([1, 4, 4], ARCH, BERNOULLI, latent_dim=99, **components).double()


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) > 0.5).double()


def normal(mean_and_logvar: torch.Tensor, dim: int) -> Normal:
    """A diagonal Gaussian from a network's raw output [..., 2 * dim] (mean, then log-variance)."""
    mean, logvar = mean_and_logvar[..., :dim], mean_and_logvar[..., dim:]
    return Normal(mean, torch.exp(0.5 * logvar))


def test_the_importance_weighted_bound_is_the_joint_one_computed_by_hand():
    vae, x, k = tiny_vae(), binary_images(5), 7
    with torch.no_grad():
        out = vae(x, k=k)
        z1, z2 = out.z[..., :Z1], out.z[..., Z1:]
        # The same networks, read by hand: q(z1|x) q(z2|z1) and p(z2) p(z1|z2) p(x|z1).
        log_q1 = normal(vae.encoder(x), Z1).log_prob(z1).sum(-1)
        log_q = log_q1 + normal(vae.posterior.second.net(z1), Z2).log_prob(z2).sum(-1)
        log_p = (
            Normal(0.0, 1.0).log_prob(z2).sum(-1)
            + normal(vae.prior.conditional.net(z2), Z1).log_prob(z1).sum(-1)
            + Bernoulli(logits=vae.decoder.net(z1).reshape(k, 5, 1, 4, 4)).log_prob(x).sum((-3, -2, -1))
        )
        by_hand = torch.logsumexp(log_p - log_q, 0) - math.log(k)

    assert out.z.shape == (k, 5, Z1 + Z2)
    torch.testing.assert_close(out.log_q, log_q)
    torch.testing.assert_close(out.iw_bound, by_hand)
    torch.testing.assert_close(out.elbo, (log_p - log_q).mean(0))  # the KL is Monte-Carlo over the joint


def test_the_density_at_any_z_is_the_one_drawn_and_the_dreg_bound_holds_the_q_z2_network_fixed():
    vae, x = tiny_vae(), binary_images(4)
    q = vae.encode(x)
    z, log_q = q.rsample(6)
    torch.testing.assert_close(q.log_prob(z), log_q)

    vae.zero_grad()
    z = z.detach().requires_grad_(True)
    q.log_prob(z, detach_params=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # a function of z alone
    assert all(p.grad is None for p in vae.posterior.second.parameters())  # q's own weights held fixed
    assert all(p.grad is None for p in vae.encoder.parameters())


def test_prior_draws_take_z1_from_p_z1_given_z2():
    vae = tiny_vae()
    with torch.no_grad():
        z = vae.prior.sample(20000, torch.Generator().manual_seed(1))
        z1, z2 = z[:, :Z1], z[:, Z1:]
        p_z1_z2 = normal(vae.prior.conditional.net(z2), Z1)
        residual = (z1 - p_z1_z2.mean) / p_z1_z2.stddev
    # z2 ~ N(0, I), and z1 given z2 is standard normal after removing p(z1|z2)'s mean and scale.
    assert z2.mean(0).abs().max() < 0.05 and (z2.std(0) - 1).abs().max() < 0.05
    assert residual.mean(0).abs().max() < 0.05 and (residual.std(0) - 1).abs().max() < 0.05


def test_the_code_is_z1_which_the_decoder_reads_alone():
    vae, x = tiny_vae(), binary_images(3)
    assert (vae.latent_dim, vae.code_dim) == (Z1 + Z2, Z1)
    code = vae.code(x)
    torch.testing.assert_close(code, vae.encoder(x)[:, :Z1])  # E_q[z1|x], exact for a Gaussian q(z1|x)
    mean, logvar = vae.encode(x).marginals()  # exact for z1, the draws' moments for z2
    torch.testing.assert_close(mean[:, :Z1], code)
    torch.testing.assert_close(logvar[:, :Z1], vae.encoder(x)[:, Z1 : 2 * Z1])
    assert mean.shape == logvar.shape == (3, Z1 + Z2)
    z2 = torch.randn(3, Z2, dtype=code.dtype)
    torch.testing.assert_close(vae.decoder(torch.cat([code, z2], -1)), vae.decoder(code))


def test_the_gap_split_refines_q_z1_with_q_z2_given_z1_fixed():
    vae, x = tiny_vae(), binary_images(20)
    second = {name: p.clone() for name, p in vae.posterior.second.named_parameters()}
    split = gap_split(vae, x, k=64, steps=100, samples=8, lr=5e-2, tolerance=-1.0)

    for name, p in vae.posterior.second.named_parameters():
        torch.testing.assert_close(p, second[name])
    assert split.n_images == 20
    assert split.amortization.mean() > -3 * split.amortization.std() / math.sqrt(20)
    assert torch.isfinite(split.approximation).all()


def test_the_latent_size_is_the_sum_of_the_layers_in_the_config_the_run_records():
    cfg = make_config("arch=mlp2", "model.latent_dim=16")
    validate(cfg)
    assert cfg.model.latent_dim == 150


@pytest.mark.subprocess
def test_a_vampprior_over_two_layers_is_refused_in_one_line_before_any_run(project: Path):
    done = run_entry("train.py", "data=digits", "arch=mlp2", "prior=vamp", root=project, check=False)
    assert done.returncode == 2
    [line] = [line for line in done.stderr.splitlines() if "prior=" in line]
    assert "prior='vamp'" in line and "standard or mog with arch=mlp2" in line and "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists() or all_runs(project) == []


SMALL = [
    *[o for o in TINY if not o.startswith(("arch.", "model."))],
    "arch=mlp2",
    "arch.latent_dims=[4,2]",
    "arch.hidden=[32]",
    "arch.top_hidden=[16]",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "eval.limit=50",
    "eval.val_limit=50",
]


@pytest.mark.integration
@pytest.mark.parametrize("prior", ["standard", pytest.param("mog", marks=pytest.mark.slow)])
def test_a_two_layer_model_trains_evaluates_resumes_and_loads_as_the_pyfunc_model(project: Path, prior: str):
    import mlflow

    from vaelab.stages.evaluate import evaluate
    from vaelab.stages.train import train

    cfg = [*SMALL, f"prior={prior}", *(["prior.components=3"] if prior == "mog" else [])]
    summary = train(make_config(*cfg))
    run_id = summary["run_id"]
    metrics = evaluate(make_config(*cfg, f"run_id={run_id}", "eval.gaps=true", "eval.gaps_limit=10"))
    assert math.isfinite(metrics["test/nll_iw"]) and math.isfinite(metrics["test/approximation_gap"])
    assert metrics["test/nll_iw"] <= -metrics["test/elbo"] + 3 * metrics["test/elbo_se"]

    # as if stopped while finishing: a resume rebuilds the model from the run's checkpoint and finishes it again
    mlflow_client(project).set_terminated(run_id, "KILLED")
    again = train(make_config(f"resume={run_id}"))
    assert again["run_id"] == run_id
    run = mlflow_client(project).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.latent_dim"] == "6"

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    codes = model.predict(images)
    assert codes.shape == (5, 4) and np.isfinite(codes).all()  # z1's posterior means
    raw = model.get_raw_model()
    assert raw.decode(codes).shape == (5, 1, 8, 8) and raw.sample(3).shape == (3, 1, 8, 8)
