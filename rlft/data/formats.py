"""Input formats and their conversion to rlft's canonical records.

Canonical records (one per training example):

* ``sft``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}`` (assistant
  ``tool_calls`` and a row's ``tools`` kept: :mod:`rlft.data.tool_messages`), or ``{"text": str}`` from plain text
  rows (:mod:`rlft.data.text_rows`: no chat template, every token trained)
* ``pairs``: ``{"prompt": [messages...], "chosen": str, "rejected": str}`` (the final assistant replies)
* ``prompts``: ``{"prompt": [messages...], **other fields of the row}`` (kept for reward functions)
* ``unpaired``: ``{"prompt": [messages...], "completion": str, "label": bool}`` (KTO's desirable/undesirable feedback)

Each input format parses a row (parsers in :mod:`rlft.data.parsers`) into :class:`Example` objects (a conversation
ending in the reply, plus an optional rejected reply); each data kind's projection (:mod:`rlft.data.kinds`) turns
examples into records. Field parsing and validation live in :mod:`rlft.data.fields`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlft.data import parsers
from rlft.data.conversion_report import ConversionReport
from rlft.data.errors import DataError, Issue, RecordError
from rlft.data.fields import Example, check_turn_order
from rlft.data.kinds import DATA_KINDS, data_kind
from rlft.data.ranked_rows import from_ranked
from rlft.data.sources import Row
from rlft.data.text_rows import TEXT_KEYS, TEXT_REFUSALS, from_text
from rlft.data.unpaired_rows import from_unpaired

__all__ = ["KINDS", "FORMATS", "Format", "ConversionReport", "convert", "detect_format"]

# the record kinds input formats convert to (rankings are read by RankingDataModule itself)
KINDS = tuple(name for name, kind in DATA_KINDS.items() if kind.project is not None)
_DETECT_ROWS = 50
_MAX_LISTED = 10
_EXAMPLES_PER_REASON = 5


# ---------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Format:
    """One input format: how to recognise it and how to turn its rows into canonical records.

    Attributes:
        name: Registry name (what users pass as ``format=``).
        keys: Human description of the keys, for error messages.
        matches: ``matches(data) -> bool``, used by auto-detection (looks at keys only).
        parse: ``parse(data, kind) -> list[Example]``; raises :class:`RecordError` for invalid rows.
        kinds: Record kinds this format can provide.
        prompt_fields: Fields that become the prompt; for ``prompts`` every other field of the row is kept.
        pair_fields: Fields besides the prompt and the response keys that a record is built from; for ``pairs``
            and ``unpaired`` every other field (a margin, a weight) is kept.
        refusals: Kind -> why this format cannot provide it, where that needs saying more than the kind's advice.
    """

    name: str
    keys: str
    matches: Callable[[dict], bool]
    parse: Callable[[dict, str], list[Example]]
    kinds: tuple[str, ...]
    prompt_fields: tuple[str, ...]
    pair_fields: tuple[str, ...] = ()
    refusals: dict[str, str] = field(default_factory=dict)

    def to_records(self, row: Row, kind: str) -> list[dict]:
        """Convert one row to 0..n records of ``kind``; raises :class:`RecordError` when the row is invalid."""
        _check_kind(self, kind)
        project = DATA_KINDS[kind].project
        consumed = frozenset({*self.prompt_fields, *self.pair_fields, *_RESPONSE_KEYS, "prompt"})
        examples = self.parse(row.data, kind)
        for example in examples:  # one turn-order rule for every format, before any template sees the turns
            check_turn_order(example.messages, example.field or "messages")
        return [project(example, row.data, prompt_fields=self.prompt_fields, consumed=consumed) for example in examples]


# A null value counts as absent: Parquet and hub datasets give every row every column, null where unset.
def _has(*keys: str) -> Callable[[dict], bool]:
    return lambda data: all(data.get(key) is not None for key in keys)


def _lacks(*keys: str) -> Callable[[dict], bool]:
    return lambda data: all(data.get(key) is None for key in keys)


def _all(*tests: Callable[[dict], bool]) -> Callable[[dict], bool]:
    return lambda data: all(test(data) for test in tests)


_SFT_KINDS = ("sft", "prompts")
_PAIR_KINDS = ("sft", "pairs", "prompts")
_UNPAIRED_KINDS = ("unpaired", "prompts")
# rows of unpaired feedback: the label decides what they are, whatever else they look like
_is_feedback = _has("prompt", "completion", "label")
_FEEDBACK_ADVICE = (
    "rows with prompt, completion and a 'label' field are unpaired feedback (KTO's format): label false marks a "
    "completion NOT to imitate, and {kind} would train on it as a target. Train on them with rlft.methods.KTO (--model "
    "rlft.methods.KTO, e.g. configs/kto/), or remove 'label' from rows whose completions should be imitated"
)
_RESPONSE_KEYS = ("completion", "chosen", "rejected", "response", "output", "messages", "conversations", "responses")


def _is_text(data: dict) -> bool:
    """Plain text: a ``text`` field in a row no other format claims (tatsu-lab/alpaca rows carry one too)."""
    return data.get("text") is not None and not any(f.matches(data) for f in FORMATS.values() if f.name != "text")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "messages",
            "messages: [{role, content}]",
            lambda d: isinstance(d.get("messages"), list),
            parsers.from_messages,
            _SFT_KINDS,
            ("messages",),
        ),
        Format(
            "sharegpt",
            "conversations: [{from, value}]",
            lambda d: isinstance(d.get("conversations"), list),
            parsers.from_sharegpt,
            _SFT_KINDS,
            ("conversations", "system"),
        ),
        Format(
            "prompt_completion",
            "prompt, completion",
            _all(_has("prompt", "completion"), _lacks("label")),
            parsers.from_prompt_completion,
            _SFT_KINDS,
            ("prompt",),
        ),
        Format(
            "unpaired",
            "prompt, completion, label (true/false)",
            _is_feedback,
            from_unpaired,
            _UNPAIRED_KINDS,
            ("prompt",),
            ("label",),
            refusals={
                "sft": _FEEDBACK_ADVICE.format(kind="SFT"),
                "pairs": "each row has one completion, not a chosen/rejected pair",
            },
        ),
        Format(
            "alpaca",
            "instruction, input, output",
            _all(_has("instruction", "output"), _lacks("instances")),
            parsers.from_instruction("input", "output"),
            _SFT_KINDS,
            ("instruction", "input"),
        ),
        Format(
            "dolly",
            "instruction, context, response",
            _has("instruction", "response"),
            parsers.from_instruction("context", "response"),
            _SFT_KINDS,
            ("instruction", "context"),
        ),
        Format(
            "hh_rlhf",
            "chosen, rejected (Human:/Assistant: transcripts)",
            _all(_has("chosen", "rejected"), _lacks("prompt"), lambda d: isinstance(d["chosen"], str)),
            parsers.from_hh,
            _PAIR_KINDS,
            ("chosen", "rejected"),
        ),
        Format(
            "preference",
            "prompt, chosen, rejected",
            _all(_has("chosen", "rejected"), lambda d: _has("prompt")(d) or isinstance(d["chosen"], list)),
            parsers.from_preference,
            _PAIR_KINDS,
            ("prompt",),
        ),
        Format(
            "piqa",
            "goal, sol1, sol2, label",
            _has("goal", "sol1", "sol2"),
            parsers.from_piqa,
            _PAIR_KINDS,
            ("goal",),
            ("sol1", "sol2", "label"),
        ),
        Format(
            "alpaca_seed",
            "instruction, instances: [{input, output}]",
            _has("instruction", "instances"),
            parsers.from_alpaca_seed,
            _SFT_KINDS,
            ("instruction", "instances"),
        ),
        Format(
            "ranked",
            "prompt, responses (best first) [, scores]",
            _has("prompt", "responses"),
            from_ranked,
            _PAIR_KINDS,
            ("prompt", "responses", "scores"),
        ),
        Format(
            "prompt_only",
            "prompt (or question), other fields kept",
            _all(lambda d: _has("prompt")(d) or _has("question")(d), _lacks(*_RESPONSE_KEYS)),
            parsers.from_prompt_only,
            ("prompts",),
            ("prompt", "question"),
        ),
        Format("text", TEXT_KEYS, _is_text, from_text, ("sft",), ("text",), refusals=TEXT_REFUSALS),
    )
}


def _check_kind(fmt: Format, kind: str, where: str = "") -> None:
    advice = data_kind(kind).advice
    if kind not in fmt.kinds:
        raise DataError(
            f"{where + ': ' if where else ''}format '{fmt.name}' cannot provide '{kind}' records: "
            f"{fmt.refusals.get(kind, advice)}. It provides: {', '.join(fmt.kinds)}."
        )


def _refuse_feedback(rows: list[Row], kind: str) -> None:
    """Unpaired feedback rows given to a kind that imitates every completion: refused whatever the format, so an
    undesirable completion is never trained as a target."""
    if not data_kind(kind).imitates_completions:
        return
    feedback = [row for row in rows if isinstance(row.data, dict) and _is_feedback(row.data)]
    if feedback:
        first = feedback[0]
        where = first.source if first.line is None else f"{first.source}:{first.line}"
        raise DataError(
            f"{where}: field 'label': {len(feedback)} of {len(rows)} rows ({_sources(rows)}) have "
            f"prompt, completion and label; {_FEEDBACK_ADVICE.format(kind=kind)}."
        )


def _format_list() -> str:
    return "; ".join(f"{f.name} ({f.keys})" for f in FORMATS.values())


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def detect_format(rows: list[Row]) -> str:
    """Name of the format that matches most of the first rows.

    Raises:
        DataError: No rows, no format matches, or several formats match equally well; the message lists the keys
            seen and the formats available, and says how to choose one with ``format=``.
    """
    if not rows:
        raise DataError("no rows to detect the format from: the data is empty")
    sample = rows[:_DETECT_ROWS]
    votes = Counter(name for row in sample for name, fmt in FORMATS.items() if fmt.matches(row.data))
    keys = sorted({key for row in sample for key in row.data})
    where = _sources(sample)
    hint = "Pass format=NAME (e.g. --data.format alpaca) to choose one."
    if not votes:
        # Parquet and hub rows carry every column, null where unset: a column of nulls is listed among the keys
        # but holds nothing, and saying only "cannot detect" would hide that
        empty = [key for key in keys if all(_is_empty(row.data.get(key)) for row in sample)]
        nulls = (
            f" Columns {empty} are null or empty in all of these rows: the data in them is missing." if empty else ""
        )
        raise DataError(
            f"{where}: cannot detect the data format; keys seen in the first {len(sample)} rows: {keys}.{nulls} "
            f"Known formats: {_format_list()}. {hint}"
        )
    best = max(votes.values())
    winners = sorted(name for name, count in votes.items() if count == best)
    if len(winners) > 1:
        raise DataError(
            f"{where}: the data format is ambiguous: rows match {', '.join(winners)} (keys seen: {keys}). {hint}"
        )
    return winners[0]


# ------------------------------------------------------------------------------------------------------- conversion
def _sources(rows: list[Row]) -> str:
    names = sorted({row.source for row in rows})
    if len(names) == 1:
        return Path(names[0]).name if Path(names[0]).exists() else names[0]
    return f"{len(names)} files" if names else "data"


def _resolve_format(rows: list[Row], name: str) -> Format:
    if name == "auto":
        return FORMATS[detect_format(rows)]
    if name not in FORMATS:
        raise DataError(f"unknown format '{name}'; use 'auto' or one of: {_format_list()}")
    return FORMATS[name]


def _invalid_error(fmt: Format, kind: str, invalid: dict[str, list[Issue]], rows: list[Row]) -> DataError:
    issues = sorted((i for group in invalid.values() for i in group), key=lambda i: (i.source, i.line or 0))
    counts = ", ".join(f"{len(group)} {reason}" for reason, group in invalid.items())
    listed = "\n".join(f"  {issue}" for issue in issues[:_MAX_LISTED])
    more = f"\n  ... and {len(issues) - _MAX_LISTED} more" if len(issues) > _MAX_LISTED else ""
    return DataError(
        f"{_sources(rows)}: {len(issues)} of {len(rows)} rows are invalid as '{fmt.name}' data for {kind} "
        f"({counts}):\n{listed}{more}\nFix them, or pass skip_invalid=True (--data.skip_invalid true) to drop "
        "invalid rows (they are counted in the conversion report).",
        issues,
    )


def convert(
    rows: list[Row],
    *,
    kind: str,
    format: str = "auto",
    on_invalid: str = "error",
    dedupe: bool = True,
    require_records: bool = True,
) -> tuple[list[dict], ConversionReport]:
    """Convert rows to canonical records of one kind.

    Args:
        rows: Rows from :func:`rlft.data.sources.read_rows`.
        kind: A record kind of :data:`KINDS`: ``"sft"``, ``"pairs"``, ``"prompts"`` or ``"unpaired"``.
        format: A name from :data:`FORMATS`, or ``"auto"`` to detect it from the first rows.
        on_invalid: ``"error"`` raises one :class:`DataError` listing the invalid rows; ``"skip"`` drops them and
            counts them by reason in the report.
        dedupe: Drop exact duplicate records (counted as ``"duplicate"``).
        require_records: Raise when no record is left; ``False`` for a caller that reads on in chunks (the first
            rows may all be skipped as invalid while later ones are fine).

    Returns:
        The records and a :class:`ConversionReport`.

    Raises:
        DataError: Unknown kind/format/on_invalid, a kind the format cannot provide, invalid rows (with
            ``on_invalid="error"``), or no records left at all.
    """
    if on_invalid not in ("error", "skip"):
        raise DataError(f"on_invalid must be 'error' or 'skip', not '{on_invalid}'")
    data_kind(kind)  # an unknown kind fails before the format is detected
    fmt = _resolve_format(rows, format)
    _check_kind(fmt, kind, _sources(rows))
    _refuse_feedback(rows, kind)  # labelled rows read by another format (prompt_completion, or a mixed file)
    invalid: dict[str, list[Issue]] = {}
    records: list[dict] = []
    locations: list[str] = []
    dropped: dict[str, list[Issue]] = {}
    seen: set[str] = set()
    for row in rows:
        try:
            converted = fmt.to_records(row, kind)
        except RecordError as err:
            invalid.setdefault(err.reason, []).append(Issue(row.source, row.line, err.field, err.message))
            continue
        for record in converted:
            key = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str) if dedupe else None
            if key is not None and key in seen:
                dropped.setdefault("duplicate", []).append(Issue(row.source, row.line, None, "duplicate record"))
                continue
            if key is not None:
                seen.add(key)
            records.append(record)
            locations.append(row.source if row.line is None else f"{row.source}:{row.line}")
    if invalid and on_invalid == "error":
        raise _invalid_error(fmt, kind, invalid, rows)
    everything = {**invalid, **dropped}
    report = ConversionReport(
        format=fmt.name,
        kind=kind,
        rows_in=len(rows),
        records_out=len(records),
        filtered={reason: len(issues) for reason, issues in everything.items()},
        examples={reason: issues[:_EXAMPLES_PER_REASON] for reason, issues in everything.items()},
        source=_sources(rows),
        locations=locations,
    )
    if not records and require_records:
        raise DataError(f"no usable records: {report.summary()}", [i for g in everything.values() for i in g])
    return records, report
