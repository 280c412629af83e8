"""Search spaces written in YAML over any config key by its dotted path, sampled through Optuna's define-by-run API.

A search file::

    metric: val/loss            # optional; --metric overrides
    direction: minimize         # optional; --direction overrides
    sampler: {name: tpe, n_startup_trials: 3}   # optional; --sampler overrides the name
    pruner: {name: median, n_warmup_steps: 5}   # optional; --pruner overrides the name
    params:
      model.init_args.optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}
      model.init_args.beta: {choices: [0.05, 0.1, 0.3]}
      model.init_args.lora.r: {int: [4, 32], step: 4}
      model.init_args.loss_type: {choices: [sigmoid, ipo]}
      model.init_args.label_smoothing: {uniform: [0.0, 0.2], when: {model.init_args.loss_type: sigmoid}}

A parameter with ``when`` is sampled only in trials where every named earlier parameter took one of the listed
values (Optuna handles such conditional spaces natively); otherwise the config keeps its own value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Param", "SearchSpace", "SearchSpaceError", "load_search_space"]

KINDS = ("log_uniform", "uniform", "int", "choices")
_OPTIONS = {"log_uniform": {"step"}, "uniform": {"step"}, "int": {"step", "log"}, "choices": set()}
_TOP_LEVEL = {"params", "metric", "direction", "sampler", "pruner"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; search spaces are full of such numbers, so accept them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


class SearchSpaceError(ValueError):
    """The search file is malformed or names a key/value the config does not accept."""


@dataclass(frozen=True)
class Param:
    """One searched config key.

    Attributes:
        key: Dotted config path, e.g. ``model.init_args.optim.lr``.
        kind: ``log_uniform``, ``uniform``, ``int`` or ``choices``.
        spec: ``[low, high]`` for ranges, the list of values for ``choices``.
        options: ``step`` (ranges), ``log`` (ints).
        when: ``{earlier_key: [allowed values]}``; the parameter exists only when all of them match.
    """

    key: str
    kind: str
    spec: list
    options: dict = field(default_factory=dict)
    when: dict = field(default_factory=dict)

    def active(self, sampled: dict[str, Any]) -> bool:
        return all(key in sampled and sampled[key] in values for key, values in self.when.items())

    def suggest(self, trial) -> Any:
        if self.kind == "choices":
            return trial.suggest_categorical(self.key, self.spec)
        low, high = self.spec
        if self.kind == "int":
            step, log = self.options.get("step", 1), self.options.get("log", False)
            return trial.suggest_int(self.key, low, high, step=step, log=log)
        return trial.suggest_float(self.key, low, high, step=self.options.get("step"), log=self.kind == "log_uniform")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one the distribution can produce (used to enqueue the config's own values)."""
        if self.kind == "choices":
            return value in self.spec
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and self.spec[0] <= value <= self.spec[1] and (self.kind != "int" or isinstance(value, int))

    def examples(self) -> list:
        """Values that together exercise the parameter's types for validation (bounds, every choice)."""
        return list(self.spec)


@dataclass
class SearchSpace:
    """The parameters of a search file plus its optional study settings."""

    params: list[Param]
    source: str = "<search>"
    metric: str | None = None
    direction: str | None = None
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)

    def sample(self, trial) -> dict[str, Any]:
        """Suggest every active parameter in file order; returns ``{dotted key: value}``."""
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(sampled):
                sampled[param.key] = param.suggest(trial)
        return sampled


def _fail(source: str, where: str, message: str) -> SearchSpaceError:
    return SearchSpaceError(f"{source}: {where}: {message}")


def _number(value: Any, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, where, f"bounds must be numbers, got {value!r}")
    return value


def _parse_param(key: str, raw: Any, earlier: list[str], source: str) -> Param:
    where = f"params.{key}"
    if not isinstance(raw, dict):
        raise _fail(source, where, f"expected a mapping like {{log_uniform: [1.0e-5, 1.0e-3]}}, got {raw!r}")
    kinds = [k for k in raw if k in KINDS]
    if len(kinds) != 1:
        raise _fail(source, where, f"give exactly one of {', '.join(KINDS)} (got keys {sorted(raw)})")
    kind = kinds[0]
    spec = raw[kind]
    unknown = set(raw) - {kind, "when"} - _OPTIONS[kind]
    if unknown:
        raise _fail(source, where, f"unknown option(s) {sorted(unknown)} for {kind}; allowed: {sorted(_OPTIONS[kind])}")
    if kind == "choices":
        if not isinstance(spec, list) or not spec:
            raise _fail(source, where, f"choices must be a non-empty list, got {spec!r}")
    else:
        if not isinstance(spec, list) or len(spec) != 2:
            raise _fail(source, where, f"{kind} takes [low, high], got {spec!r}")
        low, high = (_number(v, source, where) for v in spec)
        if kind == "int" and not all(isinstance(v, int) for v in spec):
            raise _fail(source, where, f"int bounds must be integers, got {spec!r}")
        if not low < high:
            raise _fail(source, where, f"low must be below high, got {spec!r}")
        if kind == "log_uniform" and low <= 0:
            raise _fail(source, where, f"log_uniform needs positive bounds, got {spec!r}")
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(source, where, f"when must map earlier keys to values, got {when!r}")
    for other in when:
        if other not in earlier:
            raise _fail(source, f"{where}.when", f"{other!r} is not a parameter listed before {key!r}")
    when = {k: (v if isinstance(v, list) else [v]) for k, v in when.items()}
    options = {k: raw[k] for k in _OPTIONS[kind] if k in raw}
    return Param(key, kind, list(spec), options, when)


def parse_search_space(data: Any, source: str = "<search>") -> SearchSpace:
    if not isinstance(data, dict) or "params" not in data:
        raise SearchSpaceError(f"{source}: expected a mapping with a 'params:' section of dotted config keys")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise SearchSpaceError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL)}")
    raw_params = data["params"]
    if not isinstance(raw_params, dict) or not raw_params:
        raise SearchSpaceError(f"{source}: params: expected a non-empty mapping of dotted keys to distributions")
    params: list[Param] = []
    for key, raw in raw_params.items():
        params.append(_parse_param(str(key), raw, [p.key for p in params], source))
    settings = {}
    for name in ("sampler", "pruner"):
        value = data.get(name) or {}
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise SearchSpaceError(f"{source}: {name}: expected a name or {{name: ..., <kwargs>}}, got {value!r}")
        settings[name] = value
    direction = data.get("direction")
    if direction is not None and direction not in ("minimize", "maximize"):
        raise SearchSpaceError(f"{source}: direction: expected minimize or maximize, got {direction!r}")
    return SearchSpace(params, source, data.get("metric"), direction, settings["sampler"], settings["pruner"])


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and check a search YAML (shape only; the config keys are checked against the method by the caller)."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"{path}: search file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"{path}: not valid YAML: {error}") from error
    return parse_search_space(data, str(path))
