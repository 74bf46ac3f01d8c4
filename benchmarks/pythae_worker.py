"""pythae's BaseTrainer on vaelab's default model, for `throughput.py` (run by it, in benchmarks/.venv-pythae).

The same MLP VAE as vaelab's default, written with pythae's own encoder/decoder API:
    encoder  x [B, 1, 28, 28] -> flatten -> Linear(784, 512) -> SiLU -> Linear(512, 2 * 16) -> (mean, logvar)
    decoder  z [B, 16] -> Linear(16, 512) -> SiLU -> Linear(512, 784) -> sigmoid -> [B, 1, 28, 28]
pythae's VAE with `reconstruction_loss="bce"` scores probabilities, so the decoder ends in a sigmoid where vaelab's
Bernoulli likelihood takes logits (binary_cross_entropy_with_logits); the arithmetic is otherwise the same.

Dynamic binarization: the dataset holds the grey levels scaled to [0, 1] (pythae's BaseDataset stores float32,
as every pythae user's data is), and the model draws x ~ Bernoulli(grey / 255) afresh for each batch, on the
device, before the usual forward pass: the same distribution vaelab's `Bernoulli.observe` samples.

This file imports nothing from vaelab: the venv it runs in has torch (shared with the project's venv) and
pythae, not vaelab.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from time import perf_counter

import torch
from timing import TrainingClock, write_result
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU,
               "tanh": nn.Tanh, "softplus": nn.Softplus}  # fmt: skip
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0  # vaelab's encoder clamps log-variances the same way


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def build_model(image_shape: list[int], hidden: list[int], latent_dim: int, activation: str):
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    dims = math.prod(image_shape)

    class Encoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = mlp([dims, *hidden, 2 * latent_dim], activation)

        def forward(self, x: torch.Tensor):
            mean, logvar = self.net(x.flatten(1)).chunk(2, dim=-1)
            return ModelOutput(embedding=mean, log_covariance=logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    class Decoder(BaseDecoder):
        def __init__(self):
            BaseDecoder.__init__(self)
            self.net = mlp([latent_dim, *reversed(hidden), dims], activation)

        def forward(self, z: torch.Tensor):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).unflatten(-1, tuple(image_shape)))

    class DynamicallyBinarizedVAE(VAE):
        def forward(self, inputs, **kwargs):
            return super().forward({"data": torch.bernoulli(inputs["data"])}, **kwargs)

    config = VAEConfig(input_dim=tuple(image_shape), latent_dim=latent_dim, reconstruction_loss="bce")
    return DynamicallyBinarizedVAE(config, encoder=Encoder(), decoder=Decoder())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the JSON spec throughput.py wrote")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)

    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    clock = TrainingClock(spec["warmup_epochs"], device)  # baseline RSS: after imports, before data and model
    torch.manual_seed(spec["seed"])

    images = torch.load(spec["train_file"], weights_only=True)["images"]
    if spec["limit_train"]:
        images = images[: spec["limit_train"]]
    grey = images.float() / (spec["grey_levels"] - 1)  # [N, 1, 28, 28] in [0, 1]; binarized per batch
    dataset = BaseDataset(grey, torch.zeros(len(grey)))
    del grey

    cfg = spec["config"]
    model = build_model(spec["image_shape"], list(cfg["arch"]["hidden"]), cfg["model"]["latent_dim"],
                        cfg["arch"].get("activation", "silu"))  # fmt: skip
    n, epochs = len(dataset), spec["warmup_epochs"] + spec["epochs"]

    class Meter(TrainingCallback):
        """pythae calls on_train_step_begin once per epoch, before its loop, and on_train_step_end after each step
        (after `loss.item()`, so the GPU has finished the step)."""

        epoch = 0
        last_step = 0.0

        def on_train_step_begin(self, training_config, **kwargs):
            self.epoch = kwargs["epoch"] - 1  # pythae counts epochs from 1
            clock.start(self.epoch)

        def on_train_step_end(self, training_config, **kwargs):
            self.last_step = perf_counter()

        def on_epoch_end(self, training_config, **kwargs):
            clock.stop(self.epoch, n, end=self.last_step)

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-pythae-") as out_dir:
        config = BaseTrainerConfig(
            output_dir=out_dir,
            per_device_train_batch_size=spec["batch_size"],
            num_epochs=epochs,
            learning_rate=float(cfg["optim"]["lr"]),
            optimizer_cls="Adam",
            optimizer_params={"fused": cfg["optim"]["fused"]},  # the same Adam kernel as the other paths
            seed=spec["seed"],
            no_cuda=not device.startswith("cuda"),
            amp=False,  # pythae turns AMP off for BCE anyway (BaseTrainer.__init__)
        )
        trainer = BaseTrainer(model=model, train_dataset=dataset, training_config=config, callbacks=[Meter()])
        trainer.train()

    from importlib.metadata import version

    precision = "32-true" + (" (pythae disables AMP for BCE)" if spec["precision"] != "32-true" else "")
    write_result(args.result, clock.result(precision=precision, version=f"pythae {version('pythae')}"))


if __name__ == "__main__":
    main()
