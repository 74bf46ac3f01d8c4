"""From plain config values to objects, through one list of trusted targets.

A component's config is a plain mapping whose `_target_` names the callable that builds it, with its keyword
arguments beside it (`{"_target_": "vaelab.model.networks.build_mlp", "hidden": [512]}`). Those mappings are what a
checkpoint stores as hyper-parameters, so they also arrive from files: a `_target_` there is a string that passes
torch's `weights_only=True`, and building from it calls whatever it names. So every target is resolved here, and only
a callable of a trusted kind is returned:

- anything defined in vaelab's component modules (the model layer, vaelab's own callbacks and loggers);
- a torch.optim optimizer or learning-rate scheduler class;
- `lightning.pytorch.Trainer`, or a Lightning `Callback` subclass.

Deciding calls nothing: a target's module is imported only when its name lies inside vaelab, torch.optim or
lightning.pytorch (importing any other module would run its code), and the object found is judged by what it is.
The same list guards every config read back from a file (a run's config.yaml on resume, a checkpoint's
hyper-parameters and lineage); a target outside it runs only when the user names it again (vaelab.stages.resume).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from vaelab.model.hierarchy import two_layer
from vaelab.model.likelihoods import Likelihood
from vaelab.model.posteriors import Posterior
from vaelab.model.priors import Prior
from vaelab.model.vae import VAE

# The packages whose own callables a target may name (a callable merely imported into them does not count).
TRUSTED_PACKAGES = ("vaelab.model", "vaelab.training.callbacks", "vaelab.stages.logger")
# The only modules a target's name may make Python import: library code, whose import runs nothing of a file's.
IMPORTABLE = ("vaelab", "torch.optim", "lightning.pytorch")
TRUSTED_TEXT = (
    "vaelab's own components, a torch.optim optimizer or scheduler, lightning.pytorch.Trainer or a Lightning Callback"
)


class UntrustedTarget(ValueError):
    """A `_target_` names something outside the trusted list, or nothing at all."""


def _within(module_name: str, packages: tuple[str, ...]) -> bool:
    return any(module_name == p or module_name.startswith(f"{p}.") for p in packages)


def _is_trusted(found: object, module_name: str) -> bool:
    if not callable(found):
        return False
    if _within(module_name, TRUSTED_PACKAGES) and getattr(found, "__module__", None) == module_name:
        return True
    if not inspect.isclass(found):
        return False
    if issubclass(found, torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler):
        return found.__module__.startswith("torch.optim")
    return _is_lightning_trainer_or_callback(found)


def _is_lightning_trainer_or_callback(found: type) -> bool:
    # Nothing is a Trainer or a Callback while Lightning is not loaded, and loading it costs seconds that building a
    # VAE from a checkpoint has no use for. A target inside lightning.pytorch, or a vaelab callback, loads it.
    pl = sys.modules.get("lightning.pytorch")
    return pl is not None and (found is pl.Trainer or issubclass(found, pl.Callback))


def resolve(target: object) -> Callable[..., Any]:
    """The callable that `target` (a dotted path) names, or UntrustedTarget when it is not on the trusted list.

    Only the module the path names is imported: a module of vaelab, torch or Lightning, or an untrusted one whose
    import is itself harmless because nothing from it is called."""
    if not isinstance(target, str) or "." not in target:
        raise UntrustedTarget(f"{target!r} is not a dotted path to a callable")
    module_name, _, name = target.rpartition(".")
    if not _within(module_name, IMPORTABLE):
        raise UntrustedTarget(f"{target!r} is outside vaelab, torch.optim and lightning.pytorch")
    try:
        found = getattr(importlib.import_module(module_name), name, None)
    except ImportError as error:
        raise UntrustedTarget(f"{target!r}: its module does not import ({error})") from None
    if found is None or not _is_trusted(found, module_name):
        raise UntrustedTarget(f"{target!r} is not {TRUSTED_TEXT}")
    return found


def is_trusted(target: object) -> bool:
    try:
        resolve(target)
    except UntrustedTarget:
        return False
    return True


def targets_within(value: object, where: str = "") -> Iterator[tuple[str, object]]:
    """Every `_target_` anywhere inside `value` (mappings and lists), with the dotted location of its mapping."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "_target_":
                yield where, item
            yield from targets_within(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from targets_within(item, f"{where}[{i}]")


def untrusted_targets(value: object, trusted: Iterable[str] = ()) -> list[tuple[str, object]]:
    """The `_target_`s inside `value` (with their locations) that are neither on the trusted list nor in `trusted`,
    the names the user gave."""
    also = set(trusted)
    return [(where, target) for where, target in targets_within(value) if target not in also and not is_trusted(target)]


def build(spec: dict[str, Any], **extra: Any) -> Any:
    """Call `spec["_target_"]` with the rest of `spec` and `extra` as keyword arguments. A partial config
    (`_partial_: true`, Hydra's convention) is one whose remaining arguments are the `extra` ones."""
    kwargs = {key: value for key, value in spec.items() if key not in ("_target_", "_partial_")}
    return resolve(spec.get("_target_"))(**kwargs, **extra)


DIAGONAL_GAUSSIAN = {"_target_": "vaelab.model.posteriors.DiagonalGaussian"}
STANDARD_NORMAL = {"_target_": "vaelab.model.priors.StandardNormal"}


def build_vae(
    image_shape: list[int],
    arch: dict,
    likelihood: dict,
    latent_dim: int,
    grey_levels: int = 256,
    posterior: dict | None = None,
    prior: dict | None = None,
) -> VAE:
    """The VAE that `arch`, `likelihood`, `posterior` and `prior` (plain mappings with a `_target_`) describe, for
    this image shape; without `posterior` and `prior`, a diagonal Gaussian q(z|x) and a standard normal p(z)."""
    p_x_z: Likelihood = build(likelihood, grey_levels=grey_levels)
    layers = arch.get("latent_dims")  # arch=mlp2: z1's and z2's sizes; the VAE's z is (z1, z2)
    # The chosen family is q(z1|x) and the chosen prior p(z2) of a two-layer model (vaelab.model.hierarchy).
    q_z_x: Posterior = build(posterior or DIAGONAL_GAUSSIAN, latent_dim=layers[0] if layers else latent_dim)
    p_z: Prior = build(
        prior or STANDARD_NORMAL, latent_dim=layers[-1] if layers else latent_dim, image_shape=tuple(image_shape)
    )
    if layers:
        q_z_x, p_z = two_layer(q_z_x, p_z, list(layers), list(arch["top_hidden"]), arch["activation"])
        latent_dim = sum(layers)
    encoder, decoder = build(
        arch,
        image_shape=tuple(image_shape),
        latent_dim=latent_dim,
        params_per_channel=p_x_z.params_per_channel,
        encoder_outputs=q_z_x.encoder_outputs,
    )
    return VAE(encoder, decoder, p_x_z, latent_dim, posterior=q_z_x, prior=p_z)


DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0, "fused": True}


def build_optimizer(params, optimizer: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer that the partial config `optimizer` names, over `params`. `fused: true` asks for the fused
    kernel where the class has one (Adam, AdamW, SGD) and is dropped where it has none.

    Fused Adam updates all parameters in one kernel, several times faster than the per-tensor loop
    (benchmarks/README.md)."""
    spec = dict(optimizer)
    if not spec.get("fused") or "fused" not in inspect.signature(resolve(spec["_target_"])).parameters:
        spec.pop("fused", None)
    return build(spec, params=params)
