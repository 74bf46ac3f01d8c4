"""Check a composed config before anything runs: every problem names the key, the value and what is allowed.

Entry points call `validate(cfg)` first, before data preparation and before any MLflow run exists,
so a typo costs a second, not a half-trained model and a dangling run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vaelab.errors import ConfigError

DATASETS = ("fashion_mnist", "mnist", "digits", "image_folder")
# vaelab.model.networks maps these names to modules (a test checks the two lists agree)
ACTIVATIONS = ("silu", "relu", "leaky_relu", "elu", "gelu", "tanh", "softplus")
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
    "data.root": ((lambda v: v is None or Path(str(v)).is_dir()), "null or an existing directory"),
    "arch.hidden": SIZES,
    "model.latent_dim": _int_at_least(1),
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
    "channels_last": ((lambda v: isinstance(v, bool)), "true or false"),
    "optim.fused": ((lambda v: isinstance(v, bool)), "true or false"),
    "tracking.lock_timeout_s": _number_at_least(0),
    "seed": _int_at_least(0),
    "resume": (
        (lambda v: v is None or v == "last" or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) is not None)),
        "null, `last`, or an MLflow run id (32 hex digits)",
    ),
    "tracking.experiment": ((lambda v: isinstance(v, str) and v.strip() != ""), "a non-empty string"),
    "tracking.system_metrics": ((lambda v: isinstance(v, bool)), "true or false"),
    "tracking.register_as": ((lambda v: v is None or (isinstance(v, str) and v.strip() != "")), "null or a model name"),
    "tracking.uri": (
        (lambda v: v is None or (isinstance(v, str) and v.startswith(TRACKING_SCHEMES))),
        f"null or an MLflow tracking URI starting with one of {list(TRACKING_SCHEMES)}",
    ),
}


# Keys only some configs have (data=image_folder's, likelihood=gaussian's, each objective's): checked where present.
OPTIONAL_RULES: dict[str, Rule] = {
    "objective.beta": _number_at_least(0),
    "objective.kl_warmup_epochs": _int_at_least(0),
    "objective.free_bits": _number_at_least(0),
    "objective.nats": _number_at_least(0),
    "objective.epochs": _int_at_least(0),
    "objective.gamma": POSITIVE_NUMBER,
    "objective.k": _int_at_least(2),
    "objective.dreg": ((lambda v: isinstance(v, bool)), "true or false"),
    "arch.blocks_per_stage": _int_at_least(0),
    "arch.activation": _one_of(ACTIVATIONS),
    "likelihood.variance": _one_of(("pixel", "global")),
    "likelihood.min_std": POSITIVE_NUMBER,
    "data.image_size": _int_at_least(4),
    "data.channels": ((lambda v: v is None or (_is_int(v) and v in (1, 3))), "null (auto), 1 or 3"),
}


def _rule_problems(cfg: DictConfig, rules: dict[str, Rule], optional: dict[str, Rule]) -> list[tuple[str, object, str]]:
    """Violations of `rules` (every key required) and `optional` (checked where present)."""
    found: list[tuple[str, object, str]] = []
    for key, (check, allowed) in {**rules, **optional}.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            if key not in optional:
                found.append((key, "<missing>", allowed))
        elif not check(value):
            found.append((key, value, allowed))
    return found


# Keys that moved when the objective became a component (conf/objective/): where each one lives now.
MOVED_KEYS = {
    "model.beta": "objective.beta",
    "model.kl_warmup_epochs": "objective.kl_warmup_epochs",
    "model.free_bits": "objective.free_bits",
    "model.iw_samples": "objective.k (with objective=iwae)",
    "model.dreg": "objective.dreg (with objective=iwae)",
    "model.capacity": "objective=capacity",
    "model.capacity.nats": "objective.nats (with objective=capacity)",
    "model.capacity.epochs": "objective.epochs (with objective=capacity)",
    "model.capacity.gamma": "objective.gamma (with objective=capacity)",
}


def moved(key: str, value: object) -> tuple[str, object, str]:
    return (key, value, f"nowhere: it moved to {MOVED_KEYS[key]}")


def moved_key_problems(overrides: list[str]) -> list[tuple[str, object, str]]:
    """Command-line overrides that name a moved key. Checked before Hydra composes the config, which would only say
    the key does not exist."""
    found = []
    for override in overrides:
        if override.startswith("-") or ("=" not in override and not override.startswith("~")):
            continue
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in MOVED_KEYS:
            found.append(moved(key, value))
    return found


def check_command_line(overrides: list[str]) -> None:
    """Raise ConfigError for the overrides that name a moved key."""
    found = moved_key_problems(overrides)
    if found:
        raise ConfigError(found)


def problems(cfg: DictConfig) -> list[tuple[str, object, str]]:
    """All rule violations of `cfg` as (key, value, allowed) triples; empty when the config is valid."""
    found = _rule_problems(cfg, RULES, OPTIONAL_RULES)
    # A moved key set in a config file (an old experiment, a hand-written params.yaml).
    leaves = [key for key in MOVED_KEYS if not any(other.startswith(f"{key}.") for other in MOVED_KEYS)]
    found += [moved(key, OmegaConf.select(cfg, key)) for key in leaves if OmegaConf.select(cfg, key) is not None]

    # image_folder has no default source to fall back on: its images are wherever data.root points.
    data = cfg.get("data", {})
    if data.get("name") == "image_folder" and data.get("root") is None:
        found.append(("data.root", None, "an existing directory of images (data=image_folder reads data.root)"))

    # logger=mlflow_server logs to a server, so tracking.uri must name one.
    logger = cfg.get("logger") or {}
    if str(logger.get("_target_", "")).endswith("ServerRunLogger"):
        uri = OmegaConf.select(cfg, "tracking.uri")
        if not (isinstance(uri, str) and uri.startswith(("http://", "https://"))):
            found.append(("tracking.uri", uri, "an http:// or https:// server URI when logger=mlflow_server"))

    # Lightning's 16-bit gradient scaler cannot clip the gradients of an optimizer that unscales inside its step.
    optim = cfg.get("optim", {})
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    if precision.startswith("16") and optim.get("grad_clip") is not None and optim.get("fused") is True:
        found.append(("optim.fused", True, "false when trainer.precision is 16-bit and optim.grad_clip is set"))
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid key, or return silently."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)


# Search (conf/search/<name>.yaml, chosen with search=<name>): its keys exist only in a search's config, so
# pipelines/search.py checks them with `validate_search` on top of `validate`.

# What a search may optimize, with the direction that is better. All but val/nll_iw are logged every epoch, so
# a pruner can watch them; val/nll_iw is estimated once, after training.
SEARCH_METRICS = {"val/elbo": "maximize", "val/bpd": "minimize", "val/rec": "minimize", "val/nll_iw": "minimize"}
END_OF_TRAINING_METRICS = ("val/nll_iw",)
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
PARAM_FIELDS = {  # a search-space parameter's type -> the fields it may have
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
NON_SEARCHABLE = ("search", "hydra")  # top-level keys a trial cannot vary

SEARCH_RULES: dict[str, Rule] = {
    "search.study_name": ((lambda v: isinstance(v, str) and v.strip() != ""), "a non-empty string"),
    "search.storage": (
        (lambda v: v is None or (isinstance(v, str) and re.match(r"[a-z][a-z0-9+]*://", v) is not None)),
        "null (optuna.db at the project root) or an SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...)",
    ),
    "search.n_trials": _int_at_least(1),
    "search.metric": _one_of(tuple(SEARCH_METRICS)),
    "search.direction": _one_of(("maximize", "minimize")),
    "search.pruner": _one_of(PRUNERS),
    "search.sampler": _one_of(SAMPLERS),
    "search.seed": _optional(_int_at_least(0)),
    "search.space": ((lambda v: OmegaConf.is_dict(v) and len(v) > 0), "a non-empty mapping of parameters"),
}
SEARCH_OPTIONAL_RULES: dict[str, Rule] = {
    "search.pruner_options.median.n_startup_trials": _int_at_least(0),
    "search.pruner_options.median.n_warmup_steps": _int_at_least(0),
    "search.pruner_options.median.interval_steps": _int_at_least(1),
    "search.pruner_options.hyperband.min_resource": _int_at_least(1),
    "search.pruner_options.hyperband.reduction_factor": _int_at_least(2),
}


def space_params(space: DictConfig) -> dict[str, object]:
    """The search space's parameters by config key. A parameter is a mapping with a `type`; nested keys
    (`model: {beta: {type: ...}}`, which command-line overrides can reach) and dotted ones (`model.beta: {...}`)
    name the same parameter, `model.beta`. Anything else at a leaf is returned as is, for validation to report."""
    found: dict[str, object] = {}
    for key, value in space.items():
        if OmegaConf.is_dict(value) and "type" not in value:
            found.update({f"{key}.{name}": spec for name, spec in space_params(value).items()})
        else:
            found[str(key)] = value
    return found


def _param_problems(
    cfg: DictConfig, name: str, spec: object, groups: dict[str, list[str]]
) -> list[tuple[str, object, str]]:
    """What is wrong with one parameter of the search space (`groups`: config group -> its options)."""
    key = f"search.space.{name}"
    is_group = name in groups
    value = OmegaConf.select(cfg, name, default=_MISSING)
    if name.split(".")[0] in NON_SEARCHABLE or (not is_group and (value is _MISSING or OmegaConf.is_dict(value))):
        allowed = f"a key of the training config (e.g. model.latent_dim) or a config group ({', '.join(groups)})"
        return [(key, "<not a config key>", allowed)]
    if not OmegaConf.is_dict(spec):
        return [(key, spec, "a mapping {type: float | int | categorical, low, high, log, step, choices}")]
    kind = spec.get("type")
    if kind not in PARAM_FIELDS:
        return [(f"{key}.type", kind, f"one of {list(PARAM_FIELDS)}")]
    if is_group and kind != "categorical":
        return [(f"{key}.type", kind, f"categorical: {name} is a config group, its options are {groups[name]}")]
    found = [
        (f"{key}.{field}", spec[field], f"one of the fields {list(PARAM_FIELDS[kind])} of a {kind} parameter")
        for field in spec
        if field not in PARAM_FIELDS[kind]
    ]
    check, allowed = {**RULES, **OPTIONAL_RULES}.get(name, (lambda v: True, ""))
    rule_text = f"{allowed} (what {name} allows)"

    if kind == "categorical":
        choices = spec.get("choices")
        if not (OmegaConf.is_list(choices) and len(choices) > 0):
            return [*found, (f"{key}.choices", choices, "a non-empty list")]
        for choice in choices:
            if is_group and choice not in groups[name]:
                found.append((f"{key}.choices", choice, f"an option of the config group {name}: {groups[name]}"))
            elif not is_group and not check(choice):
                found.append((f"{key}.choices", choice, rule_text))
        return found

    is_kind = _is_int if kind == "int" else _is_number
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for field, bound in (("low", low), ("high", high)):
        if not is_kind(bound):
            found.append((f"{key}.{field}", bound, "an integer" if kind == "int" else "a number"))
    if not isinstance(log, bool):
        found.append((f"{key}.log", log, "true or false"))
    if step is not None and not (is_kind(step) and step > 0):
        found.append((f"{key}.step", step, "null or " + ("an integer >= 1" if kind == "int" else "a number > 0")))
    if found:
        return found
    if low > high:
        found.append((f"{key}.low", low, f"a value <= high ({high})"))
    if log and low <= 0:
        found.append((f"{key}.low", low, "a value > 0 when log is true (a log scale starts above 0)"))
    if log and step is not None and not (kind == "int" and step == 1):
        found.append((f"{key}.step", step, "null when log is true"))
    if kind == "float" and check(int(low)) and not check(float(low)):
        return [*found, (f"{key}.type", kind, f"int: {name} takes {allowed}")]
    for field, bound in (("low", low), ("high", high)):
        if not check(float(bound) if kind == "float" else bound):
            found.append((f"{key}.{field}", bound, rule_text))
    return found


def search_problems(cfg: DictConfig, groups: dict[str, list[str]] | None = None) -> list[tuple[str, object, str]]:
    """Violations of the `search.*` keys, including every parameter of the space: it must name a key of the
    training config (or, with categorical choices, a config group in `groups`), and its range must be one the
    key allows, so a typo fails before the first trial rather than in every trial."""
    groups = groups or {}
    found = _rule_problems(cfg, SEARCH_RULES, SEARCH_OPTIONAL_RULES)
    search = cfg.get("search") or {}
    metric, direction, pruner = search.get("metric"), search.get("direction"), search.get("pruner")
    if metric in SEARCH_METRICS and direction in ("maximize", "minimize") and direction != SEARCH_METRICS[metric]:
        found.append(("search.direction", direction, f"{SEARCH_METRICS[metric]} for search.metric={metric}"))
    if metric in END_OF_TRAINING_METRICS and pruner != "none":
        found.append(("search.pruner", pruner, f"none for search.metric={metric} (it is estimated after training)"))
    if cfg.get("resume") is not None:
        found.append(("resume", cfg.resume, "null in a search (every trial is a new run)"))
    if OmegaConf.is_dict(search.get("space")):
        for name, spec in space_params(search.space).items():
            found.extend(_param_problems(cfg, name, spec, groups))
    return found


def validate_search(cfg: DictConfig, groups: dict[str, list[str]] | None = None) -> None:
    """`validate` for the training keys plus `search_problems`, all reported at once."""
    found = problems(cfg) + search_problems(cfg, groups)
    if found:
        raise ConfigError(found)
