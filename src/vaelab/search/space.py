"""The search space: each entry of `search.space` as a Param, a config key (or a config group) and the
distribution of its values, which a trial samples into a Hydra override; and what is wrong with a space, checked
before the first trial: every parameter must name a key of the training config (or, with categorical choices, a
config group), and its range must be one the key allows, so a typo fails once rather than in every trial."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vaelab.config import Problem, allowed_value

if TYPE_CHECKING:
    import optuna


PARAM_FIELDS = {  # a search-space parameter's type -> the fields it may have
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
NOT_SEARCHABLE = ("search", "hydra")  # top-level keys a trial cannot vary
_MISSING = object()


def override_value(value: Any) -> str:
    """A value as Hydra override syntax: 0.001 -> '0.001', True -> 'true', [512, 256] -> '[512,256]'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in ("true", "false", "null", "inf", "nan")
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key (or a config group) and the distribution of its values."""

    name: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()  # as Optuna stores them: None, bool, int, float or str
    texts: tuple[str, ...] = ()  # each choice as override syntax

    @classmethod
    def from_spec(cls, name: str, spec: DictConfig) -> Param:
        if spec.type == "categorical":
            values = OmegaConf.to_container(spec.choices, resolve=True)
            texts = tuple(override_value(v) for v in values)
            # A list value (arch.hidden: [512, 256]) is stored in Optuna as its override text.
            choices = tuple(text if isinstance(v, list) else v for v, text in zip(values, texts, strict=True))
            return cls(name, "categorical", choices=choices, texts=texts)
        return cls(name, spec.type, spec.low, spec.high, bool(spec.get("log", False)), spec.get("step"))

    def suggest(self, trial: optuna.Trial) -> str:
        """Sample this parameter for `trial`, as a Hydra override."""
        if self.kind == "categorical":
            value = trial.suggest_categorical(self.name, list(self.choices))
            return f"{self.name}={self.texts[self.choices.index(value)]}"
        if self.kind == "int":
            value = trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        else:
            value = trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)
        return f"{self.name}={override_value(value)}"


def parse_space(space: DictConfig) -> list[Param]:
    return [Param.from_spec(name, spec) for name, spec in space_params(space).items()]


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


def space_problems(cfg: DictConfig, groups: dict[str, list[str]]) -> list[Problem]:
    """What is wrong with the parameters of `cfg.search.space` (`groups`: config group -> its options)."""
    space = OmegaConf.select(cfg, "search.space")
    if not OmegaConf.is_dict(space):
        return []  # the schema reports it
    params = space_params(space)
    return [problem for name, spec in params.items() for problem in _param_problems(cfg, name, spec, groups)]


def _param_problems(cfg: DictConfig, name: str, spec: object, groups: dict[str, list[str]]) -> list[Problem]:
    key = f"search.space.{name}"
    is_group = name in groups
    value = OmegaConf.select(cfg, name, default=_MISSING)
    if name.split(".")[0] in NOT_SEARCHABLE or (not is_group and (value is _MISSING or OmegaConf.is_dict(value))):
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

    def refused(candidate: object) -> str | None:  # what the key allows, when it does not allow `candidate`
        allowed = allowed_value(cfg, name, candidate)
        return None if allowed is None else f"{allowed} (what {name} allows)"

    if kind == "categorical":
        choices = spec.get("choices")
        if not (OmegaConf.is_list(choices) and len(choices) > 0):
            return [*found, (f"{key}.choices", choices, "a non-empty list")]
        for choice in OmegaConf.to_container(choices, resolve=True):
            if is_group and choice not in groups[name]:
                found.append((f"{key}.choices", choice, f"an option of the config group {name}: {groups[name]}"))
            elif not is_group and (allowed := refused(choice)):
                found.append((f"{key}.choices", choice, allowed))
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
    if kind == "float" and refused(float(low)) and not refused(int(low)):
        return [*found, (f"{key}.type", kind, f"int: {name} takes {allowed_value(cfg, name, float(low))}")]
    for field, bound in (("low", low), ("high", high)):
        if allowed := refused(float(bound) if kind == "float" else bound):
            found.append((f"{key}.{field}", bound, allowed))
    return found


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
