"""Input formats beyond the table of cases: format-specific rules, detection errors, dedupe, the real data files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import FORMATS, convert, detect_format  # noqa: E402
from rlft.data.sources import read_rows  # noqa: E402
from tests.data.test_formats import CASES, assistant, rows_of, system, user  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = SHARED / "hh_rlhf_harmless_sample.jsonl"
SEED = SHARED / "alpaca_seed_tasks.jsonl"


def test_alpaca_seed_gives_one_record_per_instance() -> None:
    instances = [{"input": "3 1 2", "output": "1 2 3"}, {"input": "", "output": "Give me numbers."}]
    row = {"id": "t1", "instruction": "Sort the numbers.", "instances": instances}
    records, report = convert(rows_of(row), kind="sft", format="auto")
    assert records == [
        {"messages": [user("Sort the numbers.\n\n3 1 2"), assistant("1 2 3")]},
        {"messages": [user("Sort the numbers."), assistant("Give me numbers.")]},
    ]
    assert (report.format, report.rows_in, report.records_out) == ("alpaca_seed", 1, 2)
    prompts, _ = convert(rows_of(row), kind="prompts")
    assert prompts[1] == {"id": "t1", "output": "Give me numbers.", "prompt": [user("Sort the numbers.")]}


def test_prompt_completion_with_message_lists() -> None:
    row = {
        "prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "1+1"}],
        "completion": [{"role": "assistant", "content": "2"}],
    }
    records, _ = convert(rows_of(row), kind="sft")
    assert records == [{"messages": [system("Terse."), user("1+1"), assistant("2")]}]


def test_preference_with_full_conversations_takes_last_assistant_turn() -> None:
    convo = [{"role": "user", "content": "Name a colour"}]
    row = {
        "prompt": "Name a colour",
        "chosen": [*convo, {"role": "assistant", "content": "Blue"}],
        "rejected": [*convo, {"role": "assistant", "content": "Seven"}],
    }
    implicit = {"chosen": row["chosen"], "rejected": row["rejected"]}
    implicit_bare_rejected = {"chosen": row["chosen"], "rejected": " Seven"}
    only_reply = {"prompt": convo, "chosen": [assistant("Blue")], "rejected": [assistant("Seven")]}
    expected = [{"prompt": [user("Name a colour")], "chosen": "Blue", "rejected": "Seven"}]
    for item in (row, implicit, implicit_bare_rejected, only_reply):
        records, report = convert(rows_of(item), kind="pairs")
        assert report.format == "preference"
        assert records == expected


def test_piqa_label_zero_and_string_label() -> None:
    rows = rows_of(
        {"goal": "g", "sol1": "right", "sol2": "wrong", "label": 0},
        {"goal": "h", "sol1": "wrong", "sol2": "right", "label": "1"},
    )
    records, _ = convert(rows, kind="pairs")
    assert [(r["chosen"], r["rejected"]) for r in records] == [("right", "wrong"), ("right", "wrong")]


def test_unlabelled_piqa_still_gives_prompts() -> None:
    records, _ = convert(rows_of({"goal": "g", "sol1": "a", "sol2": "b", "label": -1}), kind="prompts")
    assert records == [{"prompt": [user("g")], "sol1": "a", "sol2": "b", "label": -1}]


def test_format_override_beats_detection() -> None:
    # Both keys present: auto-detection refuses, an explicit format decides.
    row = {"instruction": "Say hi", "output": "hi", "response": "hello"}
    with pytest.raises(DataError, match="ambiguous.*alpaca, dolly.*format="):
        convert(rows_of(row), kind="sft")
    records, _ = convert(rows_of(row), kind="sft", format="dolly")
    assert records == [{"messages": [user("Say hi"), assistant("hello")]}]


def test_unknown_format_and_kind_names() -> None:
    with pytest.raises(DataError, match="unknown format 'alpacca'.*alpaca"):
        convert(rows_of(CASES["alpaca"][0]), kind="sft", format="alpacca")
    with pytest.raises(DataError, match="unknown record kind 'dpo'"):
        convert(rows_of(CASES["alpaca"][0]), kind="dpo")


def test_unknown_keys_list_keys_and_formats() -> None:
    with pytest.raises(DataError) as info:
        detect_format(rows_of({"body": "hello", "meta": 1}))
    message = str(info.value)
    assert "mem.jsonl" in message and "['body', 'meta']" in message and "format=" in message
    assert all(name in message for name in FORMATS)


def test_detection_follows_the_majority_so_bad_rows_get_line_errors() -> None:
    good = CASES["alpaca"][0]
    rows = rows_of(good, {"instruction": "x"}, {**good, "output": "other"})
    with pytest.raises(DataError, match=r"mem.jsonl:2: field 'output': missing"):
        convert(rows, kind="sft")


def test_duplicates_are_filtered_and_counted() -> None:
    row = CASES["alpaca"][0]
    rows = rows_of(row, {**row, "output": " Guten Morgen "}, {**row, "output": "Moin"})
    records, report = convert(rows, kind="sft")
    assert len(records) == 2 and report.filtered == {"duplicate": 1}
    assert str(report.examples["duplicate"][0]).startswith("mem.jsonl:2:")
    assert report.summary() == "mem.jsonl: 3 rows (alpaca) -> 2 sft; filtered: 1 duplicate"
    records, report = convert(rows, kind="sft", dedupe=False)
    assert len(records) == 3 and report.filtered == {}


def test_real_hh_sample_converts_to_pairs() -> None:
    if not HH.exists():
        pytest.skip(f"real data not found at {HH}")
    rows = read_rows(str(HH))
    assert len(rows) == 300
    records, report = convert(rows, kind="pairs", on_invalid="skip")
    assert report.format == "hh_rlhf" and report.rows_in == 300
    assert report.rows_in == report.records_out + sum(report.filtered.values())
    assert report.records_out == len(records) > 290
    # Independent check of the first record against the raw transcript.
    raw = rows[0].data
    assert records[0]["chosen"] == raw["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert records[0]["rejected"] == raw["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert len(records[0]["prompt"]) == raw["chosen"].count("\n\nHuman:") + raw["chosen"].count("\n\nAssistant:") - 1
    for record in records:
        assert record["chosen"] and record["rejected"] and record["chosen"] != record["rejected"]
        assert record["prompt"][0]["role"] == "user" and record["prompt"][-1]["role"] == "user"
        assert all(m["content"] == m["content"].strip() for m in record["prompt"])
    assert report.summary().startswith(f"hh_rlhf_harmless_sample.jsonl: 300 rows (hh_rlhf) -> {len(records)} pairs")


def test_real_alpaca_seed_tasks_convert_to_sft() -> None:
    if not SEED.exists():
        pytest.skip(f"real data not found at {SEED}")
    rows = read_rows(str(SEED))
    records, report = convert(rows, kind="sft")
    instances = sum(len(row.data["instances"]) for row in rows)
    assert report.format == "alpaca_seed" and report.rows_in == 175
    assert report.records_out + report.filtered.get("duplicate", 0) == instances
    first = rows[0].data
    expected_user = first["instruction"].strip()
    if first["instances"][0]["input"].strip():
        expected_user += "\n\n" + first["instances"][0]["input"].strip()
    assert records[0] == {"messages": [user(expected_user), assistant(first["instances"][0]["output"].strip())]}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)


def test_hh_style_prompt_strings_become_turns() -> None:
    # As in HH-RLHF derivatives: the prompt is a transcript ending in an empty "Assistant:" cue.
    row = {
        "prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:",
        "chosen": " Knock knock.",
        "rejected": " No.",
    }
    records, _ = convert(rows_of(row), kind="pairs")
    assert records == [
        {"prompt": [user("Hi"), assistant("Hello!"), user("Joke?")], "chosen": "Knock knock.", "rejected": "No."}
    ]
    records, _ = convert(rows_of({"prompt": "Human: a\n\nAssistant: b\n\nHuman: c"}), kind="prompts")
    assert records == [{"prompt": [user("a"), assistant("b"), user("c")]}]


def test_null_columns_count_as_absent() -> None:
    # Parquet/hub rows carry every column; unset ones are null and must not change detection.
    row = {"prompt": "Hi", "completion": "Hello", "chosen": None, "rejected": None, "messages": None}
    assert detect_format(rows_of(row)) == "prompt_completion"
    row = {"prompt": None, "chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    assert detect_format(rows_of(row)) == "hh_rlhf"


def test_a_pair_field_named_like_a_batch_key_is_refused_with_its_line() -> None:
    rows = rows_of(
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
        {"prompt": "q", "chosen": "c", "rejected": "d", "prompt_lengths": 3},
    )
    with pytest.raises(DataError, match=r":2: field 'prompt_lengths': is a name rlft uses for the tokenised pair"):
        convert(rows, kind="pairs")
