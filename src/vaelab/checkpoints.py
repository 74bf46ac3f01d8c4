"""Reading a trained model back from a checkpoint file, safely: whatever the file holds, nothing in it runs, and
anything that is not a vaelab VAE checkpoint (random bytes, a pickle with code, another model, weights that do not
fit) is a CheckpointError naming the file.

Reading one imports torch and the model layer, not Lightning: evaluating a checkpoint or serving it as an MLflow model
has no use for a Trainer, and importing Lightning costs a process seconds (import-linter checks this,
pyproject.toml)."""

from __future__ import annotations

import inspect
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaelab import __version__
from vaelab.errors import CheckpointError
from vaelab.training.builder import build_vae, is_trusted, targets_within

if TYPE_CHECKING:
    from vaelab.training.module import VAEModule

# Where a checkpoint's hyper-parameters may hold a `_target_`: building the network calls what those name, so
# weights_only=True stops code hidden in the pickle, and the builder's trusted-target list stops code named in the
# hyper-parameters (a plain string passes weights_only).
INSTANTIATED_HPARAMS = ("arch", "likelihood", "objective", "posterior", "prior", "optimizer", "scheduler")
NOT_A_CHECKPOINT = "not a PyTorch checkpoint, or a truncated or corrupted one"
# A checkpoint's hyper-parameters are VAEModule's constructor arguments (vaelab.training.module): named here rather
# than read from its signature, so that reading a checkpoint imports no Lightning (a test keeps the two the same).
# Those without a default are in every vaelab checkpoint.
REQUIRED_HPARAMS = ("image_shape", "arch", "likelihood", "latent_dim", "objective", "posterior", "prior")
OPTIONAL_HPARAMS = ("optimizer", "scheduler", "nan_policy", "grey_levels", "channels_last")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, read with `weights_only=True`, or a CheckpointError saying why not.

    weights_only accepts tensors and plain values only, so a file whose pickle would call a function (any
    `__reduce__` payload) is refused before anything in it runs."""
    try:
        data = Path(path).read_bytes()  # read here, so an OSError from torch below is about the content
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        with warnings.catch_warnings():
            # torch's warnings and messages here suggest weights_only=False, which is exactly what must not happen.
            warnings.simplefilter("ignore")
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: loading it would call {unsafe.group(1)}, and a checkpoint may hold only tensors "
                "and plain values (vaelab reads checkpoints with weights_only=True). Nothing in it was run."
            ) from error
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT} (not even its pickle header reads)") from error
    except Exception as error:  # noqa: BLE001 - torch reports a damaged file with many types (EOFError, KeyError...)
        detail = str(error).split(". ")[0] or type(error).__name__
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT} ({detail})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: a PyTorch file, but not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def checked_hyperparameters(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's hyper-parameters (VAEModule's constructor arguments), refused unless every `_target_` in them
    is trusted."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and "arch" in hparams and "objective" not in hparams:
        raise CheckpointError(
            f"{path}: written by vaelab 0.1, whose checkpoints vaelab {__version__} no longer reads (the objective, "
            "posterior and prior became components); train the model again"
        )
    missing = [name for name in REQUIRED_HPARAMS if not isinstance(hparams, dict) or name not in hparams]
    if missing:
        raise CheckpointError(
            f"{path}: not a vaelab VAE checkpoint: its hyper-parameters lack {', '.join(missing)} "
            "(a checkpoint of another model, or saved without save_hyperparameters)"
        )
    known = REQUIRED_HPARAMS + OPTIONAL_HPARAMS
    hparams = {name: value for name, value in hparams.items() if name in known}
    for where, target in targets_within(hparams):
        if where not in INSTANTIATED_HPARAMS or not is_trusted(target):
            raise CheckpointError(
                f"{path}: refused: {where}._target_ is {target!r}, and building the network would call it; "
                "only vaelab's own components may be named, at the _target_ of "
                f"{', '.join(INSTANTIATED_HPARAMS)}"
            )
    return hparams


def trained_with(hparams: dict[str, Any]) -> str:
    """What a checkpoint's network is, in a few words: its architecture, latent size, image shape and likelihood."""
    arch = dict(hparams["arch"])
    target = str(arch.pop("_target_", "?")).rpartition(".")[2]
    details = ", ".join(f"{key}={value}" for key, value in arch.items())
    likelihood = str(hparams["likelihood"].get("_target_", "?")).rpartition(".")[2]
    shape = sides(hparams["image_shape"])
    latent = "" if "latent_dims" in arch else f", latent_dim {hparams['latent_dim']}"  # arch=mlp2 names its own
    return f"arch {target}({details}){latent}, images {shape}, likelihood {likelihood}"


def check_weights_fit(module: torch.nn.Module, state_dict: dict[str, Any], path: str | Path) -> None:
    """The checkpoint's tensors have the names and shapes of the network its hyper-parameters describe."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{name} is {shape_of(state_dict[name])} in the file but {shape_of(expected[name])} in that network"
        for name in expected.keys() & state_dict.keys()
        if shape_of(state_dict[name]) != shape_of(expected[name])
    ]
    problems = sorted(wrong)[:3]  # a few name the problem; all of them would be a wall of tensor shapes
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit the network its hyper-parameters describe "
            f"({trained_with(module.hparams)}): {'; '.join(problems)}"
        )


def sides(shape) -> str:
    """A shape as people write it: 1x28x28."""
    return "x".join(str(side) for side in shape)


def shape_of(value: object) -> str:
    return sides(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class Hyperparameters(dict):
    """A checkpoint's hyper-parameters, read as keys or as attributes (`hparams.latent_dim`), as a LightningModule's
    are."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TrainedModel(torch.nn.Module):
    """A trained VAE as a checkpoint holds it: the network `vae`, the `hparams` it was built from and its `lineage`
    (run id, data settings and hash, composed config: empty for a checkpoint written outside vaelab's training).

    Its weights have the checkpoint's names (`vae.*`), so they load as they were saved; `lightning_module()` gives
    the LightningModule that trained them, for a Trainer."""

    def __init__(self, hparams: dict[str, Any], lineage: dict[str, Any] | None = None):
        super().__init__()
        self.hparams = Hyperparameters(hparams)
        accepted = inspect.signature(build_vae).parameters  # the network's part; the rest configured its training
        self.vae = build_vae(**{name: value for name, value in hparams.items() if name in accepted})
        if hparams.get("channels_last"):
            self.vae.to(memory_format=torch.channels_last)  # the layout it trained in, as VAEModule builds it
        self.lineage: dict[str, Any] = lineage or {}

    def lightning_module(self) -> VAEModule:
        """The LightningModule of these hyper-parameters, holding these weights and this lineage, on the same device
        and in the same mode."""
        from vaelab.training.module import VAEModule

        module = VAEModule(**self.hparams)
        module.load_state_dict(self.state_dict())
        module.lineage = self.lineage
        device = next(self.parameters()).device
        return module.to(device).train(self.training)


def load_trained(path: str | Path, map_location: str | torch.device = "cpu") -> TrainedModel:
    """A trained model from a vaelab checkpoint, in eval mode, with a CheckpointError naming the file for anything else.

    The file is read once with `weights_only=True` and checked before anything is built from it: its
    hyper-parameters may name only vaelab's networks and likelihoods, and its weights must fit them."""
    checkpoint = read_checkpoint(path)
    hparams = checked_hyperparameters(checkpoint, path)
    try:
        model = TrainedModel(hparams, checkpoint.get("vaelab"))
    except Exception as error:  # noqa: BLE001 - any failure means the same: these values build no VAE
        raise CheckpointError(f"{path}: its hyper-parameters build no vaelab VAE ({error})") from error
    check_weights_fit(model, checkpoint["state_dict"], path)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval()
