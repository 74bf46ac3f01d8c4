"""The search space: each entry of `hydra.sweeper.params` (Hydra's sweeper syntax) as a Param, a config key (or a
config group) and the distribution of its values, which a trial samples into a Hydra override; and what is wrong with
a space, checked before the first trial: every parameter must name a key of the training config (or, with choices, a
config group), and its range must be one the key allows, so a typo fails once rather than in every trial."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vaelab.config import Problem, allowed_value
from vaelab.errors import ConfigError

if TYPE_CHECKING:
    import optuna


NOT_SEARCHABLE = ("hydra",)  # top-level keys a trial cannot vary
_MISSING = object()


def override_value(value: Any) -> str:
    """A value as Hydra override syntax: 0.001 -> '0.001', True -> 'true', [512, 256] -> '[512,256]',
    {'a': 1} -> '{a:1}'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{override_value(k)}:{override_value(v)}" for k, v in value.items()) + "}"
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


def _not_searchable(cfg: DictConfig, name: str, groups: dict[str, list[str]]) -> str | None:
    """What a searched key must be, when `name` is not one: a key of the training config or a config group."""
    value = OmegaConf.select(cfg, name, default=_MISSING)
    if name.split(".")[0] in NOT_SEARCHABLE or (name not in groups and (value is _MISSING or OmegaConf.is_dict(value))):
        return f"a key of the training config (e.g. model.latent_dim) or a config group ({', '.join(groups)})"
    return None


def _refused(cfg: DictConfig, name: str, candidate: object) -> str | None:
    """What the key `name` allows, when it does not allow `candidate` (None when it does)."""
    allowed = allowed_value(cfg, name, candidate)
    return None if allowed is None else f"{allowed} (what {name} allows)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A search space in Hydra's sweeper syntax, as the Optuna sweeper plugin reads it from hydra.sweeper.params:
#   model.latent_dim: int(tag(log, interval(2, 64)))    objective.beta: tag(log, interval(0.25, 4.0))
#   arch: choice(mlp, conv, resnet)                     trainer.max_epochs: range(1, 10, 3)

SWEEPER_PARAMS = "hydra.sweeper.params"
SWEEPER_SYNTAX = "interval(low, high), int(interval(low, high)), tag(log, ...), choice(a, b, ...), a,b or range(...)"


@dataclass(frozen=True)
class SweeperSpace:
    """hydra.sweeper.params as read: the searched keys, and the plain values every trial gets."""

    params: list[Param]  # the searched keys, in the order given
    fixed: list[str]  # plain values as overrides, "key=value" (override_value syntax)


def sweeper_entries(params: object) -> dict[str, object]:
    """hydra.sweeper.params (a DictConfig, dict or None) flattened to {dotted config key: expression}: nested
    mappings (`model: {latent_dim: ...}`) and dotted keys (`model.latent_dim: ...`) name the same key.
    Interpolations are left as written."""
    if params is None:
        return {}
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=False)
    found: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            found.update({f"{key}.{name}": expression for name, expression in sweeper_entries(value).items()})
        else:
            found[str(key)] = value
    return found


def sweeper_space(entries: Mapping[str, object]) -> SweeperSpace:
    """Each entry's expression (a string in Hydra's sweeper syntax, or a plain YAML value) as a Param or a fixed
    override. Raises ConfigError listing every entry that is not valid syntax or not a distribution this sweeper
    knows."""
    read = [_SweeperEntry.read(name, expression) for name, expression in entries.items()]
    problems = [problem for entry in read for problem in entry.problems()]
    if problems:
        raise ConfigError(problems)
    return SweeperSpace(
        params=[entry.param for entry in read if entry.param is not None],
        fixed=[entry.fixed for entry in read if entry.fixed is not None],
    )


def sweeper_space_problems(
    cfg: DictConfig, entries: Mapping[str, object], groups: dict[str, list[str]]
) -> list[Problem]:
    """What is wrong with the entries, given the composed training config `cfg` (`groups`: config group -> its
    options): their syntax, as sweeper_space reads it, whether each key exists, and whether its bounds are values
    the key allows."""
    found: list[Problem] = []
    for name, expression in entries.items():
        entry = _SweeperEntry.read(name, expression)
        not_a_key = _not_searchable(cfg, name, groups)
        if not_a_key:
            found.append(entry.problem(not_a_key))
        found += entry.problems()
        if not not_a_key and entry.param is not None and not entry.refused:
            found += [entry.problem(allowed) for allowed in _sweeper_param_refusals(cfg, entry, groups)]
    return found


@dataclass
class _SweeperEntry:
    """One hydra.sweeper.params entry as read: a Param or a fixed override, or what is wrong with its syntax."""

    name: str
    text: str  # the expression as written
    param: Param | None = None
    fixed: str | None = None
    values: tuple = ()  # a choice's values as parsed (lists stay lists), for the key's checks
    refused: list[str] = dataclasses.field(default_factory=list)  # what is allowed, per thing wrong with the syntax

    @classmethod
    def read(cls, name: str, expression: object) -> _SweeperEntry:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        entry = cls(name, expression if isinstance(expression, str) else override_value(expression))
        try:  # the key is a placeholder: only the value is read here, the key is checked against the config
            value = OverridesParser.create().parse_override(f"key={entry.text}").value()
        except HydraException as error:
            entry.refused.append(f"Hydra's sweeper syntax, {SWEEPER_SYNTAX} ({str(error).splitlines()[0]})")
            return entry
        entry._convert(value)
        return entry

    def problem(self, allowed: str) -> Problem:
        return (f"{SWEEPER_PARAMS}.{self.name}", self.text, allowed)

    def problems(self) -> list[Problem]:
        return [self.problem(allowed) for allowed in self.refused]

    def _convert(self, value: object) -> None:
        from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

        if isinstance(value, ChoiceSweep):
            self._choice(value)
        elif isinstance(value, IntervalSweep):
            self._interval(value)
        elif isinstance(value, RangeSweep):
            self._range(value)
        elif _is_sweep(value):
            self.refused.append(f"a distribution this sweeper knows: {SWEEPER_SYNTAX}")
        elif _holds_sweep(value):
            self.refused.append("a plain value, or a distribution at the top (a sweep inside a value is not sampled)")
        else:
            self.fixed = f"{self.name}={override_value(value)}"

    def _choice(self, sweep: Any) -> None:
        if sweep.tags:
            self.refused.append(f"a choice without tags (a tag of a choice means nothing to a sampler): {_tags(sweep)}")
        if sweep.shuffle:
            self.refused.append("a choice without shuffle (the sampler picks the order)")
        if any(_holds_sweep(value) for value in sweep.list):
            self.refused.append("a choice of plain values (a sweep inside a choice is not sampled)")
        if self.refused:
            return
        texts = tuple(override_value(value) for value in sweep.list)
        # A list or mapping value (arch.hidden: [512, 256]) is stored in Optuna as its override text.
        choices = tuple(
            text if isinstance(value, list | dict) else value for value, text in zip(sweep.list, texts, strict=True)
        )
        self.values = tuple(sweep.list)
        self.param = Param(self.name, "categorical", choices=choices, texts=texts)

    def _interval(self, sweep: Any) -> None:
        low, high, log = sweep.start, sweep.end, "log" in sweep.tags
        if sweep.tags - {"log"}:
            self.refused.append(f"no tag but log (this sweeper reads no other): {_tags(sweep)}")
        if not (math.isfinite(low) and math.isfinite(high)):
            self.refused.append("finite bounds (a sampler draws from a bounded interval)")
        else:
            if low > high:
                self.refused.append(f"a low bound <= the high bound ({high!r})")
            if log and low <= 0:
                self.refused.append("a low bound > 0 on a log scale (a log scale starts above 0)")
        if not self.refused:
            kind = "int" if _is_int(low) and _is_int(high) else "float"
            self.param = Param(self.name, kind, low, high, log=log)

    def _range(self, sweep: Any) -> None:
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if "log" in sweep.tags:
            self.refused.append("a range without the log tag (a stepped scale is not a log scale)")
        if sweep.tags - {"log"}:
            self.refused.append(f"a range without tags (this sweeper reads none there): {_tags(sweep)}")
        if sweep.shuffle:
            self.refused.append("a range without shuffle (the sampler picks the order)")
        if not all(math.isfinite(bound) for bound in (start, stop, step)):
            self.refused.append("finite start, stop and step")
        elif step == 0:
            self.refused.append("a step other than 0")
        elif (stop - start) * step <= 0:
            self.refused.append("a range that yields a value (it stops before `stop`, as Python's range does)")
        if self.refused:
            return
        kind = "int" if all(_is_int(bound) for bound in (start, stop, step)) else "float"
        last = _last_in_range(start, stop, step)
        low, high = (start, last) if step > 0 else (last, start)  # a descending range yields the same values
        self.param = Param(self.name, kind, low, high, step=abs(step))


def _sweeper_param_refusals(cfg: DictConfig, entry: _SweeperEntry, groups: dict[str, list[str]]) -> list[str]:
    """What the key allows, for each thing wrong with the values `entry.param` samples."""
    param, name = entry.param, entry.name
    if name in groups:
        options = groups[name]
        if param.kind != "categorical":
            return [f"a choice of options: {name} is a config group, its options are {options}"]
        return [
            f"options of the config group {name}: {options} ({override_value(value)} is not one)"
            for value in entry.values
            if value not in options
        ]
    if param.kind == "categorical":
        return [
            f"choices the key allows, not {override_value(value)}: {allowed}"
            for value in entry.values
            if (allowed := _refused(cfg, name, value))
        ]
    low, high = param.low, param.high
    if param.kind == "float" and _refused(cfg, name, float(low)) and not _refused(cfg, name, int(low)):
        takes = allowed_value(cfg, name, float(low))
        return [f"integer bounds, as int(interval(...)) or int(range(...)): {name} takes {takes}"]
    as_kind = float if param.kind == "float" else int
    refusals = {bound: _refused(cfg, name, as_kind(value)) for bound, value in (("low", low), ("high", high))}
    if refusals["low"] and refusals["low"] == refusals["high"]:
        return [f"low and high bounds the key allows: {refusals['low']}"]
    return [f"a {bound} bound the key allows: {allowed}" for bound, allowed in refusals.items() if allowed]


def _last_in_range(start: int | float, stop: int | float, step: int | float) -> int | float:
    """The last value range(start, stop, step) yields (it yields one): for floats, in decimal arithmetic, so
    range(0.1, 0.5, 0.1) ends at 0.4, not 0.4000000000000001."""
    if _is_int(start) and _is_int(stop) and _is_int(step):
        return range(start, stop, step)[-1]
    start_, stop_, step_ = (Decimal(repr(float(value))) for value in (start, stop, step))
    count = math.ceil((stop_ - start_) / step_)
    return float(start_ + (count - 1) * step_)


def _is_sweep(value: object) -> bool:
    from hydra.core.override_parser.types import Glob, Sweep

    return isinstance(value, Sweep | Glob)


def _holds_sweep(value: object) -> bool:
    """Whether `value` is a sweep or a list or mapping with one inside."""
    if isinstance(value, list):
        return any(_holds_sweep(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_sweep(item) for item in value.values())
    return _is_sweep(value)


def _tags(sweep: Any) -> str:
    return ", ".join(sorted(sweep.tags))
