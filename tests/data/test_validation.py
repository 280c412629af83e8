"""Invalid user data gives errors that name the file, the line and the field; skipping counts what it drops."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rlft.data.errors import DataError, Issue  # noqa: E402
from rlft.data.formats import convert  # noqa: E402
from rlft.data.sources import read_rows  # noqa: E402

GOOD = {
    "alpaca": {"instruction": "Say hi", "input": "", "output": "hi"},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "preference": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
    "hh_rlhf": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
    "alpaca_seed": {"instruction": "Add", "instances": [{"input": "1 1", "output": "2"}]},
    "dolly": {"instruction": "Say hi", "context": "", "response": "hi"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
}
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye"

# (name, format, kind, bad row, field named in the error, reason it is counted under, words in the message)
CASES = [
    (
        "missing field",
        "alpaca",
        "sft",
        {"instruction": "Say hi", "input": "x", "output": None},
        "output",
        "missing field",
        "missing",
    ),
    ("empty field", "alpaca", "sft", {"instruction": "   ", "output": "hi"}, "instruction", "empty field", "empty"),
    (
        "chosen is a list of ints",
        "preference",
        "pairs",
        {"prompt": "Hi", "chosen": [1, 2], "rejected": "no"},
        "chosen",
        "wrong type",
        "list of int",
    ),
    (
        "unknown role",
        "messages",
        "sft",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
        "messages[1].role",
        "unknown role",
        "'bot'",
    ),
    (
        "no assistant turn",
        "messages",
        "sft",
        {"messages": [{"role": "user", "content": "Hi"}]},
        "messages",
        "no assistant turn",
        "no assistant turn",
    ),
    (
        "identical chosen/rejected",
        "preference",
        "pairs",
        {"prompt": "Hi", "chosen": "Same ", "rejected": " Same"},
        "rejected",
        "identical chosen/rejected",
        "identical",
    ),
    (
        "HH without Assistant",
        "hh_rlhf",
        "pairs",
        {"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi"},
        "chosen",
        "unparseable transcript",
        "Assistant:",
    ),
    (
        "HH prompts differ",
        "hh_rlhf",
        "pairs",
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Howdy\n\nAssistant: Go away"},
        "rejected",
        "prompt mismatch",
        "differs from 'chosen'",
    ),
    (
        "PIQA label 2",
        "piqa",
        "pairs",
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 2},
        "label",
        "invalid label",
        "expected 0 or 1",
    ),
    (
        "empty instances",
        "alpaca_seed",
        "sft",
        {"instruction": "Add", "instances": []},
        "instances",
        "empty instances",
        "empty list",
    ),
    (
        "ShareGPT unknown role",
        "sharegpt",
        "sft",
        {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        "conversations[0].from",
        "unknown role",
        "'robot'",
    ),
    (
        "HH text before first turn",
        "hh_rlhf",
        "pairs",
        {"chosen": "Hello\n\nAssistant: x", "rejected": "y"},
        "chosen",
        "unparseable transcript",
        "does not parse",
    ),
    (
        "content not a string",
        "messages",
        "sft",
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "Hello"}]},
        "messages[0].content",
        "wrong type",
        "expected a string",
    ),
    (
        "empty completion",
        "prompt_completion",
        "sft",
        {"prompt": "Hi", "completion": "  \n"},
        "completion",
        "empty response",
        "empty",
    ),
    (
        "HH ends with Human",
        "hh_rlhf",
        "pairs",
        {"chosen": HH_PROMPT, "rejected": HH_PROMPT},
        "chosen",
        "unparseable transcript",
        "ends with a Human turn",
    ),
    (
        "chosen conversation does not start with the prompt",
        "preference",
        "pairs",
        {
            "prompt": "Hi",
            "chosen": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "A"}],
            "rejected": "B",
        },
        "chosen",
        "prompt mismatch",
        "differs from 'prompt'",
    ),
    (
        "seed instance without output",
        "alpaca_seed",
        "sft",
        {"instruction": "Add", "instances": [{"input": "1"}]},
        "instances[0].output",
        "missing field",
        "missing",
    ),
    (
        "PIQA label missing",
        "piqa",
        "pairs",
        {"goal": "g", "sol1": "a", "sol2": "b"},
        "label",
        "missing field",
        "expected 0 or 1",
    ),
    (
        "PIQA label is a bool",
        "piqa",
        "pairs",
        {"goal": "g", "sol1": "a", "sol2": "b", "label": True},
        "label",
        "invalid label",
        "bool",
    ),
    ("messages is a string", "messages", "sft", {"messages": "Hi"}, "messages", "wrong type", "list of"),
    (
        "rejected conversation ends with user",
        "preference",
        "pairs",
        {"prompt": "Hi", "chosen": "A", "rejected": [{"role": "user", "content": "Hi"}]},
        "rejected",
        "no assistant turn",
        "end with the assistant",
    ),
    (
        "alpaca input is a list",
        "alpaca",
        "sft",
        {"instruction": "Say hi", "input": ["a"], "output": "hi"},
        "input",
        "wrong type",
        "list of str",
    ),
    (
        "HH final reply empty",
        "hh_rlhf",
        "pairs",
        {"chosen": "\n\nHuman: Hi\n\nAssistant:  ", "rejected": "x"},
        "chosen",
        "empty response",
        "reply is empty",
    ),
    (
        "dolly response null",
        "dolly",
        "sft",
        {"instruction": "Say hi", "response": None},
        "response",
        "missing field",
        "missing",
    ),
    (
        "PIQA identical solutions",
        "piqa",
        "pairs",
        {"goal": "g", "sol1": "same", "sol2": "same", "label": 1},
        "rejected",
        "identical chosen/rejected",
        "identical",
    ),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # A blank line after the first row: line numbers must count physical lines, not records.
    lines = [json.dumps(rows[0]), ""] + [json.dumps(row) for row in rows[1:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(("name", "fmt", "kind", "bad", "field", "reason", "words"), CASES, ids=[c[0] for c in CASES])
def test_invalid_row_names_file_line_and_field(tmp_path, name, fmt, kind, bad, field, reason, words) -> None:
    path = tmp_path / "user_data.jsonl"
    write_jsonl(path, [GOOD[fmt], GOOD[fmt], bad])  # the bad row is on physical line 4
    rows = read_rows(str(path))
    with pytest.raises(DataError) as info:
        convert(rows, kind=kind, format=fmt)
    message = str(info.value)
    assert f"{path}:4: field '{field}':" in message, message
    assert words in message, message
    assert "skip_invalid" in message
    assert [(i.line, i.field) for i in info.value.issues] == [(4, field)]
    # Skipping drops exactly that row and counts it under its reason.
    records, report = convert(rows, kind=kind, format=fmt, on_invalid="skip", dedupe=False)
    assert len(records) == 2
    assert report.filtered == {reason: 1}
    assert report.examples[reason][0].line == 4 and report.examples[reason][0].field == field
    assert report.rows_in == report.records_out + sum(report.filtered.values())


def test_at_least_fifteen_malformed_cases() -> None:
    assert len(CASES) >= 15 and len({c[5] for c in CASES}) >= 10


def test_error_mode_collects_all_problems(tmp_path) -> None:
    rows = [GOOD["alpaca"]] + [{"instruction": f"task {i}", "output": ""} for i in range(12)]
    rows += [{"instruction": "", "output": "x"}]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as info:
        convert(read_rows(str(path)), kind="sft")
    message = str(info.value)
    assert "13 of 14 rows are invalid" in message
    assert "(12 empty response, 1 empty field)" in message
    listed = re.findall(r"many\.jsonl:(\d+): field '(\w+)'", message)
    assert listed == [(str(n), "output") for n in range(2, 12)]  # the first 10, in file order
    assert "... and 3 more" in message
    assert len(info.value.issues) == 13
    assert "skip_invalid" in message


def test_skip_counts_by_reason_and_never_drops_silently(tmp_path) -> None:
    good = GOOD["preference"]
    rows = [
        good,
        good,
        {**good, "rejected": "Hello"},
        {**good, "chosen": ""},
        {**good, "chosen": "Hi!"},
        {"prompt": "Hi", "chosen": "Hello"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    records, report = convert(read_rows(str(path)), kind="pairs", on_invalid="skip")
    assert records == [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go away"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hi!", "rejected": "Go away"},
    ]
    assert report.filtered == {"identical chosen/rejected": 1, "empty response": 1, "missing field": 1, "duplicate": 1}
    assert report.rows_in == 6 == report.records_out + sum(report.filtered.values())
    assert report.summary() == (
        "prefs.jsonl: 6 rows (preference) -> 2 pairs; filtered: 1 identical chosen/rejected, 1 empty response, "
        "1 missing field, 1 duplicate"
    )
    assert (
        str(report.examples["missing field"][0]) == f"{path}:6: field 'rejected': missing (or null); expected a "
        "non-empty string"
    )
    assert "prefs.jsonl:3: field 'rejected'" in report.details()


def test_nothing_left_is_an_error(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable records: bad.jsonl: 1 rows \(alpaca\) -> 0 sft"):
        convert(read_rows(str(path)), kind="sft", on_invalid="skip")


def test_bad_on_invalid_value() -> None:
    with pytest.raises(DataError, match="on_invalid must be 'error' or 'skip'"):
        convert([], kind="sft", on_invalid="ignore")


def test_issue_str_formats() -> None:
    assert str(Issue("a.jsonl", 3, "chosen", "is empty")) == "a.jsonl:3: field 'chosen': is empty"
    assert str(Issue("a.jsonl", None, None, "unreadable")) == "a.jsonl: unreadable"
    assert isinstance(DataError("x"), ValueError)
