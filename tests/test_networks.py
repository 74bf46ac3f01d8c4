"""Encoders and decoders: the contract every `arch` honours, and each one training end to end on real data."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from helpers.config import TINY, make_config
from vaelab import schema
from vaelab.checkpoints import load_trained
from vaelab.errors import ConfigError
from vaelab.model.networks import (
    ACTIVATION_CLASSES,
    ACTIVATIONS,
    ResidualBlock,
    build_conv,
    build_mlp,
    build_resnet,
    downsampling_plan,
)
from vaelab.model.posteriors import LOGVAR_MAX, LOGVAR_MIN, DiagonalGaussian
from vaelab.stages.train import build_module, train

ARCHS = ["mlp", "conv", "resnet"]
SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32)]  # MNIST-like, digits, colour
LATENT = 4
PARAMS_PER_CHANNEL = 2  # e.g. a Gaussian's mean and log-scale: the decoder must emit P*C channels, not C


def build(arch: str, image_shape: tuple[int, int, int], *overrides: str) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) as `arch=<arch>` builds them from conf/arch/, the way build_vae instantiates them."""
    cfg = make_config(f"arch={arch}", *overrides)
    return instantiate(
        cfg.arch,
        image_shape=image_shape,
        latent_dim=LATENT,
        params_per_channel=PARAMS_PER_CHANNEL,
        _convert_="all",
    )


@pytest.mark.parametrize("image_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_encodes_images_to_a_gaussian_and_decodes_latents_with_any_leading_dims(arch, image_shape):
    c, h, w = image_shape
    batch, k = 3, 5
    encoder, decoder = build(arch, image_shape)

    q = DiagonalGaussian(LATENT)(encoder(torch.rand(batch, c, h, w)))
    mean, logvar = q.mean, q.logvar
    assert mean.shape == logvar.shape == (batch, LATENT)

    pixels = (PARAMS_PER_CHANNEL * c, h, w)
    assert decoder(mean).shape == (batch, *pixels)
    assert decoder(torch.randn(k, batch, LATENT)).shape == (k, batch, *pixels)  # importance sampling
    assert decoder(torch.randn(LATENT)).shape == pixels  # no leading dims at all


@pytest.mark.parametrize("arch", ARCHS)
def test_an_image_or_latent_is_processed_independently_of_the_rest_of_its_batch(arch):
    # What importance-weighted evaluation relies on (and BatchNorm in training mode would break).
    encoder, decoder = build(arch, (1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    z = torch.randn(2, 3, LATENT)

    torch.testing.assert_close(encoder(x)[:1], encoder(x[:1]))
    torch.testing.assert_close(decoder(z)[1], decoder(z[1]))


@pytest.mark.parametrize("arch", ["conv", "resnet"])
def test_channels_last_changes_the_memory_format_not_the_results(arch):
    vaes = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        cfg = make_config(f"arch={arch}", f"channels_last={str(channels_last).lower()}")
        vaes[channels_last] = build_module(cfg, (3, 16, 16), 256).vae
    plain, fast = vaes[False], vaes[True]

    def conv_weights(vae):
        return [m.weight for m in vae.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]

    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(fast))
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(plain))
    x = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(fast.encoder(x), plain.encoder(x))
    z = torch.randn(5, cfg.model.latent_dim)
    torch.testing.assert_close(fast.decoder(z), plain.decoder(z))


@pytest.mark.parametrize("arch", ARCHS)
def test_logvar_is_clamped_to_the_numerically_safe_range(arch):
    encoder, _ = build(arch, (1, 8, 8))
    # Every encoder ends in one linear layer emitting [mean, logvar]; force logvar far outside the range.
    head = [m for m in encoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias[LATENT:] = torch.tensor([1e4, -1e4] * (LATENT // 2))

    logvar = DiagonalGaussian(LATENT)(encoder(torch.rand(2, 1, 8, 8))).logvar
    assert logvar[:, 0::2].eq(LOGVAR_MAX).all() and logvar[:, 1::2].eq(LOGVAR_MIN).all()


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (1, 8, 8)], ids=["28x28", "8x8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch, image_shape):
    encoder, decoder = build(arch, image_shape)
    q = DiagonalGaussian(LATENT)(encoder(torch.rand(4, *image_shape)))
    out = decoder(q.mean + q.logvar.exp())
    # Random weights: a plain sum would give zero gradient through a normalisation layer.
    (out * torch.randn_like(out)).sum().backward()

    for name, param in [*encoder.named_parameters(), *decoder.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_conv_stages_halve_the_resolution_until_a_side_would_drop_below_about_4_pixels():
    assert downsampling_plan(28, 28, 2) == ([2, 2], [(28, 28), (14, 14), (7, 7)])
    assert downsampling_plan(32, 32, 3) == ([2, 2, 2], [(32, 32), (16, 16), (8, 8), (4, 4)])
    assert downsampling_plan(8, 8, 2) == ([2, 1], [(8, 8), (4, 4), (4, 4)])  # the second stage keeps 4x4
    assert downsampling_plan(7, 9, 1) == ([2], [(7, 9), (4, 5)])


def test_resnet_puts_blocks_per_stage_residual_blocks_in_every_stage_and_conv_none():
    def count_blocks(*modules: nn.Module) -> int:
        return sum(isinstance(m, ResidualBlock) for module in modules for m in module.modules())

    assert count_blocks(*build("resnet", (1, 28, 28), "arch.hidden=[8,16]", "arch.blocks_per_stage=2")) == 2 * 2 * 2
    assert count_blocks(*build("resnet", (1, 28, 28), "arch.hidden=[8,16]")) == 2 * 2  # default: 1 per stage
    assert count_blocks(*build("conv", (1, 28, 28))) == 0


def test_a_conv_arch_without_stages_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"arch\.hidden"):
        build_resnet((1, 8, 8), latent_dim=LATENT, params_per_channel=1, hidden=[])


def activation_types(*modules: nn.Module) -> set[type]:
    """Which of the selectable nonlinearities occur anywhere inside `modules`."""
    selectable = tuple(ACTIVATION_CLASSES.values())
    return {type(m) for module in modules for m in module.modules() if isinstance(m, selectable)}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_default_activation_is_silu_everywhere_as_before(arch):
    assert make_config(f"arch={arch}").arch.activation == "silu"
    encoder, decoder = build(arch, (1, 8, 8), "arch.hidden=[8,16]" if arch != "mlp" else "arch.hidden=[16]")
    assert activation_types(encoder, decoder) == {nn.SiLU}
    assert activation_types(*build_mlp((1, 8, 8), LATENT, 1, [16])) == {nn.SiLU}  # no argument: still SiLU


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_activation_replaces_every_nonlinearity(arch):
    hidden = "arch.hidden=[8,16]" if arch != "mlp" else "arch.hidden=[16,16]"
    encoder, decoder = build(arch, (1, 8, 8), hidden, "arch.activation=tanh")
    assert activation_types(encoder, decoder) == {nn.Tanh}
    n_silu = sum(isinstance(m, nn.SiLU) for net in build(arch, (1, 8, 8), hidden) for m in net.modules())
    n_tanh = sum(isinstance(m, nn.Tanh) for net in (encoder, decoder) for m in net.modules())
    assert n_tanh == n_silu > 0  # the same places, another function


def test_config_validation_allows_exactly_the_activations_the_networks_know():
    assert schema.ACTIVATIONS == ACTIVATIONS == tuple(ACTIVATION_CLASSES)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_allowed_activation_builds_and_runs(name):
    encoder, decoder = build("mlp", (1, 8, 8), "arch.hidden=[16]", f"arch.activation={name}")
    mean = encoder(torch.rand(2, 1, 8, 8))[:, :LATENT]
    assert torch.isfinite(decoder(mean)).all()


@pytest.mark.parametrize("factory", [build_mlp, build_conv, build_resnet])
def test_an_unknown_activation_is_a_config_error_naming_the_key_value_and_choices(factory):
    with pytest.raises(ConfigError) as error:
        factory((1, 8, 8), LATENT, 1, [8], activation="swish2")
    message = str(error.value)
    assert "arch.activation" in message and "swish2" in message
    assert all(name in message for name in ACTIVATIONS)


@pytest.mark.integration
@pytest.mark.parametrize(
    "arch, hidden",
    [("mlp", "arch.hidden=[64]"), ("conv", "arch.hidden=[8,16]"), ("resnet", "arch.hidden=[8,16]")],
)
def test_every_arch_trains_end_to_end_on_digits_and_reloads(project: Path, arch, hidden):
    summary = train(make_config(*TINY, f"arch={arch}", hidden, "trainer.max_epochs=1"))

    assert math.isfinite(summary["val/elbo"]) and summary["val/elbo"] < 0
    assert math.isfinite(summary["val/nll_iw"])  # the decoder took [k, B, D] latents
    best = project / "outputs" / summary["run_id"] / "checkpoints" / "best.ckpt"
    module = load_trained(best)  # rebuilt from hparams, weights_only=True
    assert module.hparams.arch["_target_"] == f"vaelab.model.networks.build_{arch}"
