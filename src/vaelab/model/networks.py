"""Encoder and decoder networks. `arch._target_` names a factory that returns both.

Every factory takes the image shape from the data, so 1x28x28 and 1x8x8 both work, the number of encoder outputs
from the posterior family (2 * latent_dim for a diagonal Gaussian's mean and log-variance), and the number of decoder
outputs per channel from the likelihood (1 for Bernoulli logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaelab.errors import ConfigError

# `arch.activation`: the nonlinearity between layers, by name. SiLU is the default; Burda et al.'s MNIST
# benchmark uses tanh.
ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}
ACTIVATIONS = tuple(ACTIVATION_CLASSES)


def activation_class(name: str) -> type[nn.Module]:
    """The nn.Module class `arch.activation` names; a ConfigError listing the allowed names otherwise."""
    if name not in ACTIVATION_CLASSES:
        raise ConfigError([("arch.activation", name, f"one of {list(ACTIVATIONS)}")])
    return ACTIVATION_CLASSES[name]


def mlp(sizes: list[int], activation: str = "silu") -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    act = activation_class(activation)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x [B, C, H, W] -> the parameters of q(z|x), [B, outputs]."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int], outputs: int, activation: str = "silu"):
        super().__init__()
        self.net = mlp([math.prod(image_shape), *hidden, outputs], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class MLPDecoder(nn.Module):
    """z [..., latent_dim] -> likelihood parameters [..., P*C, H, W] (P parameters per channel)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden: list[int],
        latent_dim: int,
        params_per_channel: int,
        activation: str = "silu",
    ):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (params_per_channel * c, h, w)
        self.net = mlp([latent_dim, *reversed(hidden), math.prod(self.out_shape)], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.out_shape)


def build_mlp(
    image_shape: tuple[int, int, int],
    latent_dim: int,
    params_per_channel: int,
    hidden: list[int],
    activation: str = "silu",
    encoder_outputs: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The default architecture: fully connected, the decoder mirrors the encoder's hidden sizes."""
    hidden = list(hidden)
    return (
        MLPEncoder(image_shape, hidden, encoder_outputs or 2 * latent_dim, activation),
        MLPDecoder(image_shape, hidden, latent_dim, params_per_channel, activation),
    )


# -- convolutional: `conv` and `resnet` ----------------------------------------------------------------
#
# Both share one layout. The encoder is a stack of stages, one per entry of `hidden` (its channels), each
# opening with a 3x3 convolution of stride 2 that halves the resolution (stride 1 once the map is small);
# a linear layer maps the flattened final feature map to (mean, logvar). The decoder mirrors it with
# transposed convolutions. `resnet` adds residual blocks inside every stage. No BatchNorm anywhere: batch
# statistics would make an image's encoding, and so the importance-weighted evaluation, depend on which
# other images share its batch.

# Downsampling stops before a side would drop below this many pixels, so 8x8 digits keep a 4x4 map.
MIN_FEATURE_SIDE = 4


def conv_output_side(side: int, stride: int) -> int:
    """Side length after a 3x3 convolution with padding 1: ceil(side / stride)."""
    return (side - 1) // stride + 1


def downsampling_plan(height: int, width: int, n_stages: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The stride of each encoder stage, and the feature map (height, width) entering each stage plus the final one.

    Stride 2 while halving keeps both sides >= MIN_FEATURE_SIDE, then 1: 28 -> 14 -> 7, 8 -> 4 -> 4.
    """
    strides, sizes = [], [(height, width)]
    for _ in range(n_stages):
        halved = (conv_output_side(height, 2), conv_output_side(width, 2))
        stride = 2 if min(halved) >= MIN_FEATURE_SIDE else 1
        if stride == 2:
            height, width = halved
        strides.append(stride)
        sizes.append((height, width))
    return strides, sizes


def upsample(
    n_in: int, n_out: int, stride: int, in_size: tuple[int, int], out_size: tuple[int, int]
) -> nn.ConvTranspose2d:
    """The transpose of a 3x3, padding-1 conv of this stride, sized to give exactly `out_size`.

    A stride-2 conv maps both 2n and 2n - 1 pixels to n, so its transpose must be told which one to give back:
    its output side is (in - 1) * stride + 1 + output_padding. Odd sizes need no cropping (7 -> 4 -> 7 again).
    """
    output_padding = tuple(o - ((i - 1) * stride + 1) for i, o in zip(in_size, out_size, strict=True))
    return nn.ConvTranspose2d(n_in, n_out, 3, stride=stride, padding=1, output_padding=output_padding)


def group_norm(channels: int) -> nn.GroupNorm:
    """Per-image normalisation, fine for batches of one: up to 8 groups, as many as divide `channels`."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """x + f(x) with f = (GroupNorm, activation, 3x3 conv) twice: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, activation: str = "silu"):
        super().__init__()
        act = activation_class(activation)
        self.residual = nn.Sequential(
            group_norm(channels),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class ConvEncoder(nn.Module):
    """x [B, C, H, W] -> the parameters of q(z|x), [B, outputs]."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden: list[int],
        outputs: int,
        blocks_per_stage: int,
        activation: str = "silu",
    ):
        super().__init__()
        c, h, w = image_shape
        act = activation_class(activation)
        strides, sizes = downsampling_plan(h, w, len(hidden))
        stages: list[nn.Module] = []
        for n_in, n_out, stride in zip([c, *hidden[:-1]], hidden, strides, strict=True):
            stages += [nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1), act()]
            stages += [ResidualBlock(n_out, activation) for _ in range(blocks_per_stage)]
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(hidden[-1] * math.prod(sizes[-1]), outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(x)  # [B, hidden[-1], h, w]
        return self.head(features.flatten(1))


class ConvDecoder(nn.Module):
    """z [..., latent_dim] -> likelihood parameters [..., P*C, H, W]: the encoder's stages in reverse."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden: list[int],
        latent_dim: int,
        params_per_channel: int,
        blocks_per_stage: int,
        activation: str = "silu",
    ):
        super().__init__()
        c, h, w = image_shape
        act = activation_class(activation)
        self.out_shape = (params_per_channel * c, h, w)
        strides, sizes = downsampling_plan(h, w, len(hidden))  # the encoder's; walked backwards here
        self.first_map = (hidden[-1], *sizes[-1])
        self.project = nn.Sequential(nn.Linear(latent_dim, math.prod(self.first_map)), act())

        # Stage i undoes encoder stage i: hidden[i] channels at sizes[i + 1] -> hidden[i - 1] at sizes[i].
        # The last one (i = 0) outputs the likelihood parameters, so no activation follows it.
        out_channels = [self.out_shape[0], *hidden[:-1]]
        stages: list[nn.Module] = []
        for i in reversed(range(len(hidden))):
            stages += [ResidualBlock(hidden[i], activation) for _ in range(blocks_per_stage)]
            stages.append(upsample(hidden[i], out_channels[i], strides[i], sizes[i + 1], sizes[i]))
            if i > 0:
                stages.append(act())
        self.stages = nn.Sequential(*stages)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Convolutions take one batch dim: fold the leading dims (e.g. [k, B]) into it and back out.
        leading = z.shape[:-1]
        features = self.project(z.reshape(-1, z.shape[-1])).unflatten(-1, self.first_map)  # [N, hidden[-1], h, w]
        return self.stages(features).reshape(*leading, *self.out_shape)  # [..., P*C, H, W]


def build_conv(
    image_shape: tuple[int, int, int],
    latent_dim: int,
    params_per_channel: int,
    hidden: list[int],
    activation: str = "silu",
    encoder_outputs: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Plain convolutional stages, the decoder mirroring the encoder; `hidden` lists each stage's channels."""
    return build_resnet(
        image_shape, latent_dim, params_per_channel, hidden, 0, activation, encoder_outputs=encoder_outputs
    )


def build_resnet(
    image_shape: tuple[int, int, int],
    latent_dim: int,
    params_per_channel: int,
    hidden: list[int],
    blocks_per_stage: int = 1,
    activation: str = "silu",
    encoder_outputs: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Convolutional stages with `blocks_per_stage` residual blocks each (0 is `build_conv`)."""
    hidden = list(hidden)
    if not hidden:
        raise ValueError("arch.hidden: a convolutional architecture needs at least one stage (channel count), got []")
    if blocks_per_stage < 0:
        raise ValueError(f"arch.blocks_per_stage: must be an int >= 0, got {blocks_per_stage}")
    return (
        ConvEncoder(image_shape, hidden, encoder_outputs or 2 * latent_dim, blocks_per_stage, activation),
        ConvDecoder(image_shape, hidden, latent_dim, params_per_channel, blocks_per_stage, activation),
    )
