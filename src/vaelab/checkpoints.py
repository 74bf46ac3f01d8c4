"""Reading a trained model back from a checkpoint file, safely: whatever the file holds, nothing in it runs, and
anything that is not a vaelab VAE checkpoint (random bytes, a pickle with code, another model, weights that do not
fit) is a CheckpointError naming the file."""

from __future__ import annotations

import inspect
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vaelab import __version__
from vaelab.errors import CheckpointError
from vaelab.training.builder import is_trusted, targets_within
from vaelab.training.module import VAEModule

# Where a checkpoint's hyper-parameters may hold a `_target_`: building the network calls what those name, so
# weights_only=True stops code hidden in the pickle, and the builder's trusted-target list stops code named in the
# hyper-parameters (a plain string passes weights_only).
INSTANTIATED_HPARAMS = ("arch", "likelihood", "objective", "posterior", "prior", "optimizer", "scheduler")
NOT_A_CHECKPOINT = "not a PyTorch checkpoint, or a truncated or corrupted one"


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
    """VAEModule's constructor arguments from the checkpoint, refused unless every `_target_` in them is trusted."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and "arch" in hparams and "objective" not in hparams:
        raise CheckpointError(
            f"{path}: written by vaelab 0.1, whose checkpoints vaelab {__version__} no longer reads (the objective, "
            "posterior and prior became components); train the model again"
        )
    init = inspect.signature(VAEModule.__init__).parameters
    required = [name for name, p in init.items() if name != "self" and p.default is inspect.Parameter.empty]
    missing = [name for name in required if not isinstance(hparams, dict) or name not in hparams]
    if missing:
        raise CheckpointError(
            f"{path}: not a vaelab VAE checkpoint: its hyper-parameters lack {', '.join(missing)} "
            "(a checkpoint of another model, or saved without save_hyperparameters)"
        )
    hparams = {name: value for name, value in hparams.items() if name in init}
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


def check_weights_fit(module: VAEModule, state_dict: dict[str, Any], path: str | Path) -> None:
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


def load_trained(path: str | Path, map_location: str | torch.device = "cpu") -> VAEModule:
    """A trained module from a vaelab checkpoint, with a CheckpointError naming the file for anything else.

    The file is read once with `weights_only=True` and checked before anything is built from it: its
    hyper-parameters may name only vaelab's networks and likelihoods, and its weights must fit them."""
    checkpoint = read_checkpoint(path)
    hparams = checked_hyperparameters(checkpoint, path)
    try:
        module = VAEModule(**hparams)
    except Exception as error:  # noqa: BLE001 - any failure means the same: these values build no VAE
        raise CheckpointError(f"{path}: its hyper-parameters build no vaelab VAE ({error})") from error
    check_weights_fit(module, checkpoint["state_dict"], path)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.to(map_location).eval()
