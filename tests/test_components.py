"""A VAE variant is a component: one class with only its own keys and one YAML file, built from plain values through
one trusted-target list."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import CONF, make_config
from vaelab.checkpoints import load_trained
from vaelab.errors import CheckpointError, VaelabError
from vaelab.model.flows import IAF, Planar
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.mixture_priors import MixtureOfGaussians, VampPrior
from vaelab.model.networks import build_mlp
from vaelab.model.objectives import ELBO, IWAE, Capacity, beta_vae_loss, capacity_loss
from vaelab.model.posteriors import DiagonalGaussian, FullGaussian
from vaelab.model.priors import StandardNormal
from vaelab.model.vae import VAE
from vaelab.stages.resume import resumption
from vaelab.training.builder import UntrustedTarget, build, resolve


@pytest.fixture
def one_pass():
    torch.manual_seed(0)
    vae = VAE(*build_mlp((1, 8, 8), 3, 1, [16]), Bernoulli(), 3)
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.4))
    return vae, x


def test_the_elbo_component_is_the_beta_weighted_loss_with_its_warmup_and_free_bits(one_pass):
    vae, x = one_pass
    out = vae(x)
    torch.testing.assert_close(ELBO().loss(out, progress=0.0), -out.elbo.mean())  # beta = 1: the plain ELBO
    torch.testing.assert_close(ELBO(beta=4.0).loss(out, 0.0), beta_vae_loss(out.rec, out.kl_per_dim, 4.0))
    warming = ELBO(beta=4.0, kl_warmup_epochs=4)
    torch.testing.assert_close(warming.loss(out, progress=1.0), beta_vae_loss(out.rec, out.kl_per_dim, 1.0))
    torch.testing.assert_close(ELBO(free_bits=5.0).loss(out, 0.0), beta_vae_loss(out.rec, out.kl_per_dim, 1.0, 5.0))
    assert (ELBO().ramp_epochs, warming.ramp_epochs, ELBO().latent_samples) == (0, 4, 1)


def test_the_capacity_component_pins_the_kl_to_its_ramped_target_and_logs_it(one_pass):
    vae, x = one_pass
    out = vae(x)
    capacity = Capacity(nats=20.0, epochs=10, gamma=100.0)
    torch.testing.assert_close(capacity.loss(out, progress=5.0), capacity_loss(out.rec, out.kl, 100.0, 10.0))
    assert capacity.logged() == {"train/capacity": 10.0}
    assert capacity.ramp_epochs == 10


@pytest.mark.parametrize("dreg", [False, True])
def test_the_iwae_component_draws_k_latents_and_maximizes_the_iw_bound(one_pass, dreg: bool):
    vae, x = one_pass
    iwae = IWAE(k=7, dreg=dreg)
    torch.manual_seed(1)
    out = vae(x, k=iwae.latent_samples)
    assert out.z.shape[0] == 7
    torch.testing.assert_close(iwae.loss(out, progress=0.0), -out.iw_bound.mean())  # DReG changes only gradients


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        *((f"objective={name}", cls) for name, cls in (("elbo", ELBO), ("capacity", Capacity), ("iwae", IWAE))),
        ("posterior=diag_gaussian", DiagonalGaussian),
        ("posterior=full_gaussian", FullGaussian),
        ("posterior=planar", Planar),
        ("posterior=iaf", IAF),
        ("prior=standard", StandardNormal),
        ("prior=mog", MixtureOfGaussians),
        ("prior=vamp", VampPrior),
    ],
)
def test_every_component_file_builds_its_class_from_plain_values(group: str, expected: type):
    name, option = group.split("=")
    assert (CONF / name / f"{option}.yaml").is_file()
    spec = OmegaConf.to_container(make_config(group)[name], resolve=True)
    # What build_vae adds: the latent size to a posterior; the latent size and image shape to a prior.
    context = {"posterior": {"latent_dim": 4}, "prior": {"latent_dim": 4, "image_shape": (1, 8, 8)}}.get(name, {})
    assert isinstance(build(spec, **context), expected)


@pytest.mark.parametrize(
    "target",
    [
        "vaelab.model.objectives.IWAE",
        "vaelab.model.networks.build_conv",
        "vaelab.training.callbacks.EpochHistory",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.ModelCheckpoint",
    ],
)
def test_the_builder_resolves_vaelab_components_optimizers_trainers_and_callbacks(target: str):
    assert callable(resolve(target))


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.exec",
        "subprocess.run",
        "torch.load",  # torch, but not an optimizer
        "vaelab.files.replace_dir",  # vaelab's, but not a component
        "vaelab.model.objectives.dataclass",  # a callable imported into a component module, not defined there
        "lightning.pytorch.loggers.MLFlowLogger",  # Lightning's, but neither a Trainer nor a Callback
        "nonsense",
        42,
    ],
)
def test_the_builder_refuses_every_other_target(target):
    with pytest.raises(UntrustedTarget):
        resolve(target)
    with pytest.raises(UntrustedTarget):
        build({"_target_": target})


def old_hyperparameters() -> dict:
    """A checkpoint's hyper-parameters as vaelab 0.1 wrote them: the objective as flat keys."""
    return {
        "image_shape": [1, 8, 8],
        "arch": {"_target_": "vaelab.networks.build_mlp", "hidden": [16]},
        "likelihood": {"_target_": "vaelab.likelihoods.Bernoulli"},
        "latent_dim": 3,
        "beta": 1.0,
        "iw_samples": 1,
    }


def test_a_checkpoint_written_by_vaelab_0_1_is_refused_with_what_to_do(tmp_path: Path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": old_hyperparameters(), "vaelab": {}}, path)
    with pytest.raises(CheckpointError) as refusal:
        load_trained(path)
    message = str(refusal.value)
    assert message.startswith(f"{path}: written by vaelab 0.1") and "train the model again" in message


def test_a_run_started_by_vaelab_0_1_cannot_be_resumed_and_says_so(project: Path):
    run_id = "a" * 32
    folder = project / "outputs" / run_id
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "hyper_parameters": old_hyperparameters()}, folder / "checkpoints" / "last.ckpt")
    old = OmegaConf.to_container(make_config(), resolve=False)
    del old["objective"], old["posterior"], old["prior"]
    old["model"] |= {"beta": 1.0, "iw_samples": 1}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(old))
    with pytest.raises(VaelabError, match=f"cannot resume run {run_id}: .* written by vaelab 0.1"):
        resumption(make_config(f"resume={run_id}"), [f"resume={run_id}"])


def test_the_optimizer_and_scheduler_are_partial_configs_the_module_completes():
    from vaelab.stages.train import build_module

    module = build_module(make_config("scheduler=cosine", "trainer.max_epochs=7", "optim.lr=0.002"), (1, 8, 8), 256)
    built = module.configure_optimizers()
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == 0.002
    assert isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) and schedule.T_max == 7
    plain = build_module(make_config("optim._target_=torch.optim.RMSprop"), (1, 8, 8), 256).configure_optimizers()
    assert isinstance(plain, torch.optim.RMSprop)  # no fused kernel: the key is dropped, not passed
