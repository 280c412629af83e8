"""Reward sources for online RL, named in YAML and combined as a weighted sum.

Every source is a callable ``f(prompts, completions, **fields) -> list[float]`` (or ``(list[float], {name: value})``
to log named metrics as ``train/reward/<source>/<name>``): ``prompts`` are the chat messages (or strings) of each row,
``completions`` the decoded responses and ``fields`` every other record field (``answer``, ``test``, ``entry_point``
...) as lists aligned with the rows, plus ``stage`` (``train`` or ``validate``), ``step`` and the completions' ids.
Sources are built from a :class:`RewardSpec`::

    rewards:
      - {source: exact_match, options: {field: answer, extract: last_number}}
      - {source: regex, weight: 0.5, options: {pattern: '^\\d+$'}}
      - {source: code_tests, options: {timeout_s: 5, memory_mb: 512}}
      - {source: reward_model, options: {path: runs/rm/hf_model}}
      - {source: my_package.rewards:brevity, options: {limit: 20}}   # any importable function (or file.py:function)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlft.registry import import_object
from rlft.rl.answers import MISSING_REFERENCE, extract_code, extractor, is_correct, is_missing, reference

RewardFunction = Callable[..., Sequence[float]]


@dataclass
class RewardSpec:
    """One reward source.

    Args:
        source: A built-in source (``exact_match``, ``regex``, ``code_tests``, ``length``, ``reward_model``) or a
            Python function as ``module:function`` / ``path/to/file.py:function`` called as
            ``function(prompts, completions, **fields, **options) -> list[float]``.
        weight: Multiplier of this source in the summed reward.
        name: Metric name (``train/reward/<name>``); default the source name.
        options: Keyword arguments of the source (see each built-in's docstring).
    """

    source: str
    weight: float = 1.0
    name: str | None = None
    options: dict = field(default_factory=dict)


def _field(fields: dict, name: str, source: str, rows: int) -> list:
    if name not in fields:
        raise KeyError(
            f"reward {source!r} needs the field {name!r} in every prompt record; the records have "
            f"{sorted(fields) or 'no extra fields'}. Add it to the data or set options.field"
        )
    values = fields[name]
    if len(values) != rows:
        raise ValueError(f"reward {source!r}: field {name!r} has {len(values)} values for {rows} completions")
    return values


def exact_match(
    field: str = "answer",  # noqa: A002 - `field` is the YAML option's name
    extract: str = "full",
    case_sensitive: bool = False,
    missing: str = "error",
) -> RewardFunction:
    """1.0 when the extracted answer equals the record's reference field after normalisation, else 0.0.

    Args:
        field: Record field holding the reference answer (a string or a list of accepted answers).
        extract: ``full`` (whole completion), ``last_number``, ``boxed`` (``\\boxed{..}``), ``answer_tag``
            (``<answer>..</answer>``) or a regex (its first group is the answer).
        case_sensitive: Compare non-numeric answers with case.
        missing: A row whose reference is absent (``None``, NaN from an empty CSV/Parquet cell, an empty list):
            ``error`` (default) stops with the row and field named; ``skip`` gives it 0.0 and counts such rows
            as the metric ``train/reward/<name>/missing_reference``. Never scored against the text ``"None"``.
    """
    extractor(extract)  # a bad extractor name fails when the reward is built, not at the first rollout
    if missing not in MISSING_REFERENCE:
        raise ValueError(f"exact_match: missing must be one of {MISSING_REFERENCE}, got {missing!r}")

    def reward(prompts, completions, **fields):
        references = _field(fields, field, "exact_match", len(completions))
        scores, skipped = [], 0
        for row, (completion, value) in enumerate(zip(completions, references)):
            if missing == "skip" and is_missing(value):
                scores.append(0.0)
                skipped += 1
                continue
            gold = reference(value, row=row, field=field, where=f"exact_match reward ({_prompt_hint(prompts, row)})")
            scores.append(float(is_correct(completion, gold, extract, case_sensitive=case_sensitive)[0]))
        return (scores, {"missing_reference": skipped}) if missing == "skip" else scores

    return reward


def _prompt_hint(prompts: Sequence, row: int) -> str:
    """The start of a row's prompt, so a user can find the record behind a rollout row."""
    prompt = prompts[row] if row < len(prompts) else ""
    if isinstance(prompt, (list, tuple)) and prompt:
        prompt = prompt[-1].get("content", "") if isinstance(prompt[-1], dict) else prompt[-1]
    text = " ".join(str(prompt).split())
    return f"prompt {text[:60]!r}" + ("..." if len(text) > 60 else "")


def regex_match(pattern: str, field: str | None = None, fullmatch: bool = False) -> RewardFunction:  # noqa: A002
    """1.0 when the completion matches ``pattern`` (e.g. an answer format), else 0.0.

    Args:
        pattern: Regular expression; ``{field}`` in it is replaced by the record's (escaped) ``field`` value.
        field: Record field substituted into the pattern, if any.
        fullmatch: The whole stripped completion must match (default: search anywhere).
    """
    if field is None:
        compiled = re.compile(pattern, flags=re.DOTALL)
    elif "{field}" not in pattern:
        raise ValueError(f"regex reward: field={field!r} is set but the pattern has no '{{field}}' placeholder")

    def reward(prompts, completions, **fields) -> list[float]:
        values = _field(fields, field, "regex", len(completions)) if field else [None] * len(completions)
        scores = []
        for row, (completion, value) in enumerate(zip(completions, values)):
            if field is not None and is_missing(value):  # would otherwise match the text "None"
                reference(value, row=row, field=field, where=f"regex reward ({_prompt_hint(prompts, row)})")
            rx = compiled if field is None else re.compile(pattern.replace("{field}", re.escape(str(value))), re.DOTALL)
            matcher = rx.fullmatch if fullmatch else rx.search
            scores.append(float(matcher(completion.strip()) is not None))
        return scores

    return reward


def _near_target(length: int, target: int) -> float:
    return max(0.0, 1.0 - abs(length - target) / target)


def _at_most(length: int, target: int) -> float:
    return min(1.0, target / max(length, 1))


LENGTH_MODES: dict[str, Callable[[int, int], float]] = {"target": _near_target, "at_most": _at_most}


def length_target(target: int, unit: str = "words", mode: str = "target") -> RewardFunction:
    """Reward a response length, in ``[0, 1]``.

    Args:
        target: Wanted length.
        unit: ``words`` (whitespace-separated) or ``chars``.
        mode: ``target`` gives ``1 - |length - target| / target`` clipped at 0 (1.0 exactly at the target);
            ``at_most`` gives ``min(1, target / length)`` (brevity: 1.0 up to the target, decaying smoothly above).
    """
    if target < 1 or unit not in ("words", "chars") or mode not in LENGTH_MODES:
        raise ValueError(
            f"length reward needs target >= 1, unit 'words' or 'chars' and mode in {sorted(LENGTH_MODES)}; "
            f"got {target}, {unit!r}, {mode!r}"
        )
    measure = (lambda text: len(text.split())) if unit == "words" else len
    score = LENGTH_MODES[mode]

    def reward(prompts, completions, **fields) -> list[float]:
        return [score(measure(c), target) for c in completions]

    return reward


def build_test_program(code: str, test: str, entry_point: str | None, prefix: str = "") -> str:
    """HumanEval-style program: optional prompt prefix, the code, the tests, then ``check(entry_point)``."""
    parts = [prefix + code, test]
    if entry_point:
        parts.append(f"check({entry_point})")
    return "\n\n".join(parts) + "\n"


def code_tests(
    test_field: str = "test",
    entry_point_field: str | None = "entry_point",
    prefix_field: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int | None = None,
) -> RewardFunction:
    """1.0 when the completion's code passes the record's unit tests in the sandbox, else 0.0 (errors, timeouts).

    Each program runs in :func:`rlft.rl.sandbox.run_program` (own process group, time and memory limits, no network
    where namespaces work, writes confined to a temporary folder).

    Args:
        test_field: Field with the test code (HumanEval's ``test`` defines ``check(candidate)``).
        entry_point_field: Field naming the function to check; ``None`` runs the tests as they are.
        prefix_field: Field prepended to the completion (HumanEval's ``prompt`` in completion mode).
        timeout_s: Wall-clock limit per program.
        memory_mb: Address-space limit per program.
        workers: Programs run at once (default: CPU count, at most 8).
    """
    from rlft.rl.sandbox import run_programs

    def reward(prompts, completions, **fields) -> list[float]:
        rows = len(completions)
        tests = _field(fields, test_field, "code_tests", rows)
        for row, test in enumerate(tests):  # a missing test would run as the program `None` and pass
            if is_missing(test):
                reference(test, row=row, field=test_field, where=f"code_tests reward ({_prompt_hint(prompts, row)})")
        entries = _field(fields, entry_point_field, "code_tests", rows) if entry_point_field else [None] * rows
        prefixes = _field(fields, prefix_field, "code_tests", rows) if prefix_field else [""] * rows
        code = [c if prefix_field else extract_code(c) for c in completions]
        programs = [build_test_program(*args) for args in zip(code, tests, entries, prefixes)]
        results = run_programs(programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
        return [float(r.passed) for r in results]

    return reward


def reward_model(path: str, batch_size: int = 8, max_length: int = 1024, device: str = "auto") -> RewardFunction:
    """Scores from a trained :class:`rlft.methods.RewardModel` (exported folder or ``.ckpt``), loaded on first use.

    Args:
        path: Reward-model folder (``RewardModel``'s export) or checkpoint file.
        batch_size: Sequences per forward.
        max_length: Longer conversations keep their end.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"reward_model: {path} does not exist; train one with rlft.methods.RewardModel")

    @functools.cache
    def scorer():
        from rlft.models.reward import RewardScorer

        target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        return RewardScorer.from_pretrained(path, device=target, batch_size=batch_size, max_length=max_length)

    def reward(prompts, completions, **fields) -> list[float]:
        return scorer().score(list(prompts), list(completions)).tolist()

    return reward


REWARD_SOURCES: dict[str, Callable[..., RewardFunction]] = {
    "exact_match": exact_match,
    "regex": regex_match,
    "length": length_target,
    "code_tests": code_tests,
    "reward_model": reward_model,
}


def import_function(reference: str) -> Callable:
    """Import ``package.module:function`` or ``path/to/file.py:function`` (a reward source of your own)."""
    if ":" not in reference:
        raise ValueError(
            f"reward source {reference!r}: expected a built-in {sorted(REWARD_SOURCES)} or module:function"
        )
    function = import_object(reference, "reward source")
    if not callable(function):
        raise AttributeError(f"reward source {reference!r} is not a function")
    return function


def build_reward(spec: RewardSpec) -> RewardFunction:
    """The callable a :class:`RewardSpec` names, with its options bound."""
    options = dict(spec.options or {})
    if spec.source in REWARD_SOURCES:
        try:
            return REWARD_SOURCES[spec.source](**options)
        except TypeError as error:
            raise TypeError(f"reward {spec.source!r}: bad options {options} ({error})") from error
    function = import_function(spec.source)
    return functools.partial(function, **options) if options else function


class Rewards:
    """A weighted sum of reward sources.

    Args:
        specs: :class:`RewardSpec` objects (or dicts with the same keys).
    """

    def __init__(self, specs: Sequence[RewardSpec | dict]) -> None:
        specs = [RewardSpec(**s) if isinstance(s, dict) else s for s in specs]
        if not specs:
            raise ValueError("no reward source: set `rewards` (e.g. [{source: exact_match}]) or override reward()")
        self.names = _unique_names(specs)
        self.weights = [s.weight for s in specs]
        self.functions = [build_reward(s) for s in specs]

    def __call__(
        self, prompts: Sequence, completions: Sequence[str], fields: dict[str, list] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total reward ``[N]`` and, by name, each source's raw reward ``[N]`` plus the named metrics a
        source reported (``name/metric``: a function may return ``(rewards, {metric: value})``)."""
        fields = fields or {}
        parts, total = {}, torch.zeros(len(completions))
        for name, weight, function in zip(self.names, self.weights, self.functions):
            values = function(list(prompts), list(completions), **fields)
            if isinstance(values, tuple) and len(values) == 2 and isinstance(values[1], dict):
                values, metrics = values
                parts.update({f"{name}/{key}": _metric(value, name, key) for key, value in metrics.items()})
            parts[name] = as_reward_tensor(values, len(completions), name)
            total = total + weight * parts[name]
        return total, parts


def reward_fields(rollout, *, step: int, stage: str) -> dict:
    """What every reward source sees besides prompts and completions, for a :class:`~rlft.rl.rollout.Rollout`: the
    rows' record fields (a multi-turn rollout's ``conversation``, ``turns``, ``tool_calls``, ``invalid_tool_calls``
    and ``env_reward`` among them), ``completion_ids`` (the model's tokens, stop tokens included),
    ``completion_lengths``, ``step`` and ``stage``. Training and ``rlft eval agent`` build them here, so a reward
    function reads the same fields in both."""
    return {
        **rollout.fields,
        "completion_ids": [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)],
        "completion_lengths": rollout.response_lengths.tolist(),
        "step": step,
        "stage": stage,
    }


def total_reward(
    rewards: Rewards | None, prompts: Sequence, completions: Sequence[str], fields: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The configured ``rewards`` plus, in a multi-turn rollout, the environment's reward (``fields["env_reward"]``,
    reported as the part ``environment``): ``(total [N], parts)``, or ``None`` when there is neither (the caller
    says what to configure). The one sum the online methods train on and ``rlft eval agent`` reports."""
    environment = fields.get("env_reward")
    if rewards is None:
        return None if environment is None else (torch.tensor(environment, dtype=torch.float32), {})
    total, parts = rewards(prompts, completions, fields)
    if environment is not None:
        parts["environment"] = torch.tensor(environment, dtype=torch.float32)
        total = total + parts["environment"]
    return total, parts


def _metric(value, source: str, key: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"reward {source!r} reported a non-finite metric {key!r}: {value}")
    return tensor.mean()


def as_reward_tensor(values, rows: int, name: str = "reward") -> torch.Tensor:
    """Check a reward function's output (one finite number per completion) and make it a float tensor."""
    tensor = torch.as_tensor(values.tolist() if torch.is_tensor(values) else list(values), dtype=torch.float32)
    if tensor.shape != (rows,):
        raise ValueError(f"reward {name!r} returned {tuple(tensor.shape)} values for {rows} completions")
    if not all(math.isfinite(v) for v in tensor.tolist()):
        raise ValueError(f"reward {name!r} returned a non-finite value: {tensor.tolist()}")
    return tensor


def _unique_names(specs: Sequence[RewardSpec]) -> list[str]:
    names, seen = [], {}
    for spec in specs:
        base = spec.name or spec.source.rpartition(":")[2]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names
