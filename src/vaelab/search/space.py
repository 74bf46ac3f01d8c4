"""The search space: each entry of `search.space` as a Param, a config key (or a config group) and the
distribution of its values, which a trial samples into a Hydra override."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vaelab.config import space_params

if TYPE_CHECKING:
    import optuna


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
