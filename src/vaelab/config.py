"""Check a composed config before anything runs: every problem names the key, the value and what is allowed.

Entry points call `validate(cfg)` first, before data preparation and before any MLflow run exists,
so a typo costs a second, not a half-trained model and a dangling run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vaelab.errors import ConfigError

DATASETS = ("fashion_mnist", "mnist", "digits", "image_folder")
ACTIVATIONS = ("silu", "relu", "leaky_relu", "elu", "gelu", "tanh", "softplus")  # vaelab.networks maps them
NAN_POLICIES = ("fail", "skip")
SCHEDULERS = (None, "cosine")
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "file:", "postgresql", "mysql", "databricks")

_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# key -> (is it valid?, description of what is allowed)
Rule = tuple[Callable[[object], bool], str]


def _int_at_least(low: int) -> Rule:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number_at_least(low: float) -> Rule:
    return (lambda v: _is_number(v) and v >= low), f"a number >= {low}"


def _count_or_fraction(low: int) -> Rule:
    """A hold-out size: a count of images, or a fraction of them (what suits a folder of unknown size)."""
    return (
        (lambda v: (_is_int(v) and v >= low) or (isinstance(v, float) and 0 < v < 1)),
        f"an integer >= {low} or a fraction in (0, 1)",
    )


def _optional(rule: Rule) -> Rule:
    check, text = rule
    return (lambda v: v is None or check(v)), f"null or {text}"


def _one_of(options: tuple) -> Rule:
    return (lambda v: v in options), f"one of {list(options)}"


POSITIVE_NUMBER: Rule = ((lambda v: _is_number(v) and v > 0), "a number > 0")
SIZES: Rule = (
    (lambda v: OmegaConf.is_list(v) and len(v) > 0 and all(_is_int(n) and n > 0 for n in v)),
    "a non-empty list of integers > 0 (layer sizes, or channels per stage)",
)

RULES: dict[str, Rule] = {
    "data.name": _one_of(DATASETS),
    "data.batch_size": _int_at_least(1),
    "data.limit_train": _optional(_int_at_least(1)),
    "data.val_size": _count_or_fraction(1),
    "data.test_size": _count_or_fraction(0),
    "data.split_seed": _int_at_least(0),
    "data.binarize_seed": _int_at_least(0),
    "data.num_workers": _int_at_least(0),
    "data.root": ((lambda v: v is None or Path(str(v)).is_dir()), "null or an existing directory"),
    "arch.hidden": SIZES,
    "model.latent_dim": _int_at_least(1),
    "model.beta": _number_at_least(0),
    "model.kl_warmup_epochs": _int_at_least(0),
    "model.free_bits": _number_at_least(0),
    "model.iw_samples": _int_at_least(1),
    "model.dreg": ((lambda v: isinstance(v, bool)), "true or false"),
    "model.capacity.nats": _optional(_number_at_least(0)),
    "model.capacity.epochs": _int_at_least(0),
    "model.capacity.gamma": POSITIVE_NUMBER,
    "optim.lr": POSITIVE_NUMBER,
    "optim.weight_decay": _number_at_least(0),
    "optim.grad_clip": ((lambda v: v is None or (_is_number(v) and v > 0)), "null or a number > 0"),
    "optim.scheduler": _one_of(SCHEDULERS),
    "trainer.max_epochs": _int_at_least(1),
    "eval.iw_k": _int_at_least(1),
    "eval.val_iw_k": _int_at_least(1),
    "eval.val_limit": _optional(_int_at_least(1)),
    "eval.limit": _optional(_int_at_least(1)),
    "nan_policy": _one_of(NAN_POLICIES),
    "compile": ((lambda v: isinstance(v, bool)), "true or false"),
    "seed": _int_at_least(0),
    "tracking.experiment": ((lambda v: isinstance(v, str) and v.strip() != ""), "a non-empty string"),
    "tracking.uri": (
        (lambda v: v is None or (isinstance(v, str) and v.startswith(TRACKING_SCHEMES))),
        f"null or an MLflow tracking URI starting with one of {list(TRACKING_SCHEMES)}",
    ),
}


# Keys only some configs have (data=image_folder's, likelihood=gaussian's): checked where present.
OPTIONAL_RULES: dict[str, Rule] = {
    "arch.blocks_per_stage": _int_at_least(0),
    "arch.activation": _one_of(ACTIVATIONS),
    "likelihood.variance": _one_of(("pixel", "global")),
    "likelihood.min_std": POSITIVE_NUMBER,
    "data.image_size": _int_at_least(4),
    "data.channels": ((lambda v: v is None or (_is_int(v) and v in (1, 3))), "null (auto), 1 or 3"),
}


def problems(cfg: DictConfig) -> list[tuple[str, object, str]]:
    """All rule violations of `cfg` as (key, value, allowed) triples; empty when the config is valid."""
    found: list[tuple[str, object, str]] = []
    for key, (check, allowed) in {**RULES, **OPTIONAL_RULES}.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            if key not in OPTIONAL_RULES:
                found.append((key, "<missing>", allowed))
        elif not check(value):
            found.append((key, value, allowed))

    # image_folder has no default source to fall back on: its images are wherever data.root points.
    data = cfg.get("data", {})
    if data.get("name") == "image_folder" and data.get("root") is None:
        found.append(("data.root", None, "an existing directory of images (data=image_folder reads data.root)"))

    # Combinations. The IWAE bound has no separate KL term for beta, warm-up or free bits to act on, and
    # the capacity objective replaces beta's weighting with its own gamma and target.
    model = cfg.get("model", {})
    iwae = _is_int(model.get("iw_samples")) and model.iw_samples > 1
    capacity = OmegaConf.select(model, "capacity.nats") is not None
    for active, name in ((iwae, "model.iw_samples > 1 (IWAE objective)"), (capacity, "model.capacity.nats is set")):
        if not active:
            continue
        for key, neutral in (("beta", 1), ("free_bits", 0), ("kl_warmup_epochs", 0)):
            if model.get(key) != neutral:
                found.append((f"model.{key}", model.get(key), f"{neutral} when {name}"))
    if iwae and capacity:
        found.append(("model.capacity.nats", model.capacity.nats, "null when model.iw_samples > 1 (IWAE objective)"))
    if model.get("dreg") is True and not iwae:
        found.append(("model.dreg", True, "false unless model.iw_samples > 1 (DReG is a gradient for the IWAE bound)"))
    if cfg.get("resume") is not None:
        found.append(("resume", cfg.resume, "null (resuming a run is not available yet)"))
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid key, or return silently."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)
