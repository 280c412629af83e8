"""Readers and validators for the two import formats.

1. **Pairs** — one JSON object per line::

       {"prompt": "..." | [{"role": ..., "content": ...}, ...], "response_a": "...", "response_b": "...",
        "model_a": "...", "model_b": "...", "category": "..."}

   ``model_a``, ``model_b`` and ``category`` are optional.
2. **Two models' generations** — two JSONL files of ``{"prompt": ..., "completion" | "response": ..., "model": ...}``
   joined on the prompt. When a prompt occurs several times in a file (several samples), the n-th occurrence in
   file A is paired with the n-th occurrence in file B. Rows without a partner are counted and reported, never
   dropped silently. The model name is the row's ``model`` field, else the name given on the command line, else the
   file's stem.

Every problem is reported as ``file:line: field: what was expected``; all problems of a file are collected before
:class:`ImportValidationError` is raised, so a user can fix them in one go.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MAX_ERRORS_SHOWN = 20


class ImportValidationError(ValueError):
    """Input rows that cannot be imported; ``errors`` holds one ``source:line: field: message`` string each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{len(errors)} invalid row(s):\n  {shown}{more}")


@dataclass
class PairRecord:
    """One example to label: a prompt (chat messages) and two responses."""

    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    model_a: str | None = None
    model_b: str | None = None
    category: str | None = None
    source: str | None = None


@dataclass
class GenerationJoin:
    """Result of joining two generation files on the prompt."""

    records: list[PairRecord]
    unmatched_a: int = 0
    unmatched_b: int = 0
    notes: list[str] = field(default_factory=list)


def normalise_prompt(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt as chat messages; a plain string becomes one user turn. Raises ``ValueError`` with ``where``."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: prompt: must not be empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        messages = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
                raise ValueError(
                    f"{where}: prompt[{i}]: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {msg!r:.80}"
                )
            messages.append({"role": msg["role"], "content": msg["content"]})
        return messages
    raise ValueError(f"{where}: prompt: expected a non-empty string or list of chat messages, got {value!r:.80}")


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key}: expected a string, got {type(value).__name__}")
    return value


def _required_text(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in row:
            value = row[key]
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key}: expected a string, got {type(value).__name__}")
            return value
    raise ValueError(f"{where}: {'/'.join(keys)}: missing (keys present: {sorted(row)})")


def parse_pair_row(row: Any, where: str) -> PairRecord:
    """Validate one pairs-format row (see module docstring)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise ValueError(f"{where}: prompt: missing (keys present: {sorted(row)})")
    return PairRecord(
        prompt=normalise_prompt(row["prompt"], where),
        response_a=_required_text(row, ("response_a",), where),
        response_b=_required_text(row, ("response_b",), where),
        model_a=_optional_str(row, "model_a", where),
        model_b=_optional_str(row, "model_b", where),
        category=_optional_str(row, "category", where),
        source=where,
    )


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", parsed_object)``; a line that is not JSON yields a ``ValueError`` in place of the row."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")


def parse_pair_rows(rows: Iterable[tuple[str, Any]]) -> list[PairRecord]:
    """Validate every row; raise :class:`ImportValidationError` listing all bad rows."""
    records, errors = [], []
    for where, row in rows:
        try:
            if isinstance(row, ValueError):
                raise row
            records.append(parse_pair_row(row, where))
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ImportValidationError(errors)
    return records


def load_pairs(path: str | Path) -> list[PairRecord]:
    """Read and validate a pairs-format JSONL file."""
    return parse_pair_rows(read_jsonl(path))


def _parse_generations(rows: Iterable[tuple[str, Any]], default_model: str, errors: list[str]) -> list[tuple]:
    parsed = []
    for where, row in rows:
        try:
            if isinstance(row, ValueError):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "prompt" not in row:
                raise ValueError(f"{where}: prompt: missing (keys present: {sorted(row)})")
            prompt = normalise_prompt(row["prompt"], where)
            text = _required_text(row, ("completion", "response"), where)
            model = _optional_str(row, "model", where) or default_model
            parsed.append((json.dumps(prompt, sort_keys=True), prompt, text, model, row.get("category"), where))
        except ValueError as exc:
            errors.append(str(exc))
    return parsed


def join_generations(
    rows_a: Iterable[tuple[str, Any]],
    rows_b: Iterable[tuple[str, Any]],
    model_a: str,
    model_b: str,
) -> GenerationJoin:
    """Pair two models' generations on the prompt (see module docstring for the rules)."""
    errors: list[str] = []
    gens_a = _parse_generations(rows_a, model_a, errors)
    gens_b = _parse_generations(rows_b, model_b, errors)
    if errors:
        raise ImportValidationError(errors)
    by_prompt_b: dict[str, list[tuple]] = defaultdict(list)
    for gen in gens_b:
        by_prompt_b[gen[0]].append(gen)
    used_b: dict[str, int] = defaultdict(int)
    records, unmatched_a, notes = [], 0, []
    for key, prompt, text_a, name_a, category, where_a in gens_a:
        candidates = by_prompt_b.get(key, [])
        if used_b[key] >= len(candidates):
            unmatched_a += 1
            if len(notes) < MAX_ERRORS_SHOWN:
                notes.append(f"{where_a}: no generation for this prompt in file B")
            continue
        _, _, text_b, name_b, category_b, where_b = candidates[used_b[key]]
        used_b[key] += 1
        cat = category if isinstance(category, str) else category_b if isinstance(category_b, str) else None
        records.append(PairRecord(prompt, text_a, text_b, name_a, name_b, cat, f"{where_a} + {where_b}"))
    unmatched_b = sum(len(cands) - used_b[key] for key, cands in by_prompt_b.items())
    for key, cands in by_prompt_b.items():
        for gen in cands[used_b[key] :]:
            if len(notes) < MAX_ERRORS_SHOWN:
                notes.append(f"{gen[5]}: no generation for this prompt in file A")
    return GenerationJoin(records, unmatched_a, unmatched_b, notes)


def load_generations(
    path_a: str | Path, path_b: str | Path, model_a: str | None = None, model_b: str | None = None
) -> GenerationJoin:
    """Read two generation files and join them (model names default to the file stems)."""
    return join_generations(
        read_jsonl(path_a), read_jsonl(path_b), model_a or Path(path_a).stem, model_b or Path(path_b).stem
    )
