"""Check a composed config before anything runs: every problem names the key, the value and what is allowed.

Entry points call `validate(cfg)` first, before data preparation and before any MLflow run exists, so a typo
costs a second, not a half-trained model and a dangling run. The keys, types and ranges are `vaelab.schema`'s;
this module turns what pydantic and Hydra report into vaelab's `key=value: allowed ...` lines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pydantic import BaseModel, ValidationError

from vaelab.errors import ConfigError
from vaelab.schema import SWEEPER, Config, OptunaSweeper

Problem = tuple[str, object, str]


# Keys that moved when the objective became a component (conf/objective/), and when the optimizer and its schedule
# became partial configs: where each one lives now.
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
    "optim.grad_clip": "trainer.gradient_clip_val",
    "optim.scheduler": "the scheduler group (scheduler=cosine)",
}


def moved(key: str, value: object) -> Problem:
    return (key, value, f"nowhere: it moved to {MOVED_KEYS[key]}")


def moved_key_problems(overrides: list[str]) -> list[Problem]:
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


# A composed config against the schema


def as_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    """The config as plain values, interpolations resolved, without Hydra's own node."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)


def problems(cfg: DictConfig | dict) -> list[Problem]:
    """All violations of the schema in `cfg` as (key, value, allowed) triples; empty when the config is valid."""
    try:
        values = as_dict(cfg)
    except InterpolationResolutionError as error:  # e.g. ${oc.env:VAR} with VAR unset: the key, not a traceback
        written = OmegaConf.to_container(cfg, resolve=False)
        for part in error.full_key.split("."):
            written = written.get(part) if isinstance(written, dict) else written
        reason = str(error).splitlines()[0]
        return [(error.full_key or "config", written, f"an interpolation that resolves ({reason})")]
    return _problems(Config, values)


def validate(cfg: DictConfig | dict) -> None:
    """Raise ConfigError listing every invalid key, or return silently (after `settle`)."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)
    settle(cfg)


def settle(cfg: DictConfig | dict) -> None:
    """Set the keys that other keys decide, so that the run's params and checkpoint say what was built: with
    `arch.latent_dims` (arch=mlp2), model.latent_dim is their sum, the size of the joint latent z = (z1, z2)."""
    layers = OmegaConf.select(cfg, "arch.latent_dims") if isinstance(cfg, DictConfig) else None
    if layers is not None:
        cfg.model.latent_dim = sum(layers)


def is_ddp(strategy: object) -> bool:
    """A DDP strategy (ddp, ddp_spawn, ddp_find_unused_parameters_true, ...): one that starts the script again in
    every rank, unless a launcher outside it (srun, torchrun) has started them."""
    return isinstance(strategy, str) and "ddp" in strategy


def search_problems(cfg: DictConfig, sweeper: DictConfig) -> list[Problem]:
    """Violations of the `hydra.sweeper.*` keys of a search (the space's parameters are vaelab.search.space's to
    check), and what a search cannot do with the training config `cfg` that every trial starts from."""
    values = as_dict(cfg)
    plain = OmegaConf.to_container(sweeper, resolve=True) if isinstance(sweeper, DictConfig) else dict(sweeper)
    own = {key: value for key, value in plain.items() if key not in ("_target_", "_recursive_")}
    found = _problems(OptunaSweeper, own, prefix=SWEEPER)
    if values.get("resume") is not None:
        found.append(("resume", values["resume"], "null in a search (every trial is a new run)"))
    strategy = (values.get("trainer") or {}).get("strategy")
    if is_ddp(strategy):
        allowed = (
            "no DDP strategy in a search: each rank would run the whole search again. Train one trial per GPU "
            "instead, as several search workers on one study (docs/search.md)"
        )
        found.append(("trainer.strategy", strategy, allowed))
    return found


def allowed_value(cfg: DictConfig, key: str, value: Any) -> str | None:
    """What `key` allows when `value` is not allowed there (None when it is): the config with `value` put in."""
    values = as_dict(cfg)
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[leaf] = value
    return next((allowed for found, _, allowed in problems(values) if found == key), None)


def _problems(schema: type[BaseModel], values: Any, prefix: str = "") -> list[Problem]:
    """`values` against `schema`, whose keys sit under `prefix` in the config."""
    try:
        schema.model_validate(values)
    except ValidationError as error:
        found: dict[str, Problem] = {}
        for detail in error.errors():
            for problem in _described(schema, detail, values, prefix):
                found.setdefault(problem[0], problem)  # one line per key (a union reports each member)
        return list(found.values())
    return []


def _described(schema: type[BaseModel], detail: dict[str, Any], values: Any, prefix: str) -> list[Problem]:
    """One pydantic error as vaelab's (key, value, allowed): the key as the user writes it, the value as given."""
    if detail["type"] == "vaelab":  # a rule across keys names its own key
        ctx = detail["ctx"]
        return [(".".join(filter(None, (prefix, ctx["key"]))), ctx["value"], ctx["allowed"])]
    parts, field, parent, options = _locate(schema, detail["loc"])
    value = _select(values, parts)
    parts = [*filter(None, [prefix]), *parts]
    key = ".".join(parts)
    if detail["type"] == "extra_forbidden":
        extra = detail["input"]
        if isinstance(extra, dict) and any(k.startswith(f"{key}.") for k in MOVED_KEYS):
            return [moved(f"{key}.{name}", v) for name, v in extra.items() if f"{key}.{name}" in MOVED_KEYS]
        if key in MOVED_KEYS:
            return [moved(key, extra)]
        where = ".".join(parts[:-1]) or "the config"
        keys = sorted(field.alias or name for name, field in parent.model_fields.items())
        return [(key, extra, f"nowhere: {where} has the keys {keys}")]
    if detail["type"] in ("union_tag_invalid", "union_tag_not_found"):
        chosen_by = next(iter(options.values())).model_fields[field.discriminator]
        tag = detail["ctx"].get("tag", "<missing>")
        return [(f"{key}.{chosen_by.alias or field.discriminator}", tag, f"one of {sorted(options)}")]
    if detail["type"] == "missing":
        return [(key, "<missing>", field.description if field else "a value")]
    return [(key, value, (field.description if field else None) or detail["msg"])]


def _locate(schema: type[BaseModel], loc: tuple) -> tuple[list[str], Any, type[BaseModel], dict]:
    """Walk an error's location through the schema: the key's parts, its field, the model holding it and, where
    the key is a union of options, those options by tag. Tags, list indices and union members are not keys."""
    model, parts, field, options = schema, [], None, {}
    node: Any = schema
    for part in loc:
        if isinstance(node, dict):  # the options of a union by tag, or a mapping's values (under "*")
            if part in node:
                node = node[part]
                continue
            if "*" not in node:
                break
            parts.append(str(part))
            node = node["*"]
            continue
        if node is None or isinstance(part, int):
            break  # below a leaf: a list item or a member of a plain union; the leaf is reported whole
        model = node
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        parts.append(str(part))
        if part not in fields:
            field = None
            break
        field = fields[part]
        node = options = _options(field.annotation, field.discriminator)
        if not isinstance(node, dict):
            options = {}
    return parts, field, model, options


def _options(annotation: Any, discriminator: str | None) -> Any:
    """What lies below a field: a model, a union's models by tag, a mapping's model (under "*"), or None (a leaf)."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not NoneType]
        if len(members) == 1:
            return _options(members[0], discriminator)
        if discriminator and all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return {tag: m for m in members for tag in get_args(m.model_fields[discriminator].annotation)}
        return None
    if origin is dict:
        value = _options(get_args(annotation)[1], None)
        return {"*": value} if value is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _select(values: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(values, dict) or part not in values:
            return "<missing>"
        values = values[part]
    return values


# Hydra's own errors (a group option that does not exist, a key the chosen option lacks, an override it cannot
# parse) come from composing the config, before vaelab sees it: entry points run Hydra inside `hydra_errors`.


@contextmanager
def hydra_errors() -> Iterator[None]:
    """Hydra's composition errors as ConfigErrors. Hydra prints them itself and exits 1 unless HYDRA_FULL_ERROR is
    set, so this sets it (a bug's traceback is then printed whole, which is no loss)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        yield
    except MissingConfigException as error:
        group, _, option = str(error.missing_cfg_file or "").rpartition("/")
        if error.options is None or not group:
            allowed = f"an existing config ({_first_line(error)})"
            raise ConfigError([("config", error.missing_cfg_file, allowed)]) from None
        raise ConfigError([(group, option, f"one of {sorted(error.options)}")]) from None
    except OverrideParseException as error:
        key, _, value = str(error.override).partition("=")
        raise ConfigError([(key, value, f"Hydra override syntax ({_first_line(error)})")]) from None
    except ConfigCompositionException as error:
        found = re.search(r"Could not override '([^']+)'.*use \+[^=]+=(.*)$", str(error), re.S)
        if found is None:
            raise ConfigError([("override", "<invalid>", f"a valid override ({_first_line(error)})")]) from None
        key, value = found.groups()
        parent, _, leaf = key.rpartition(".")
        allowed = f"nowhere: {parent or 'the config'} has no key {leaf}"
        raise ConfigError([moved(key, value) if key in MOVED_KEYS else (key, value, allowed)]) from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0]
