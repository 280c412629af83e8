"""Every input format converts to each record kind it supports, with exact expected records."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import FORMATS, KINDS, convert, detect_format  # noqa: E402
from rlft.data.sources import Row, read_rows  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = SHARED / "hh_rlhf_harmless_sample.jsonl"
SEED = SHARED / "alpaca_seed_tasks.jsonl"


def rows_of(*items: dict) -> list[Row]:
    return [Row(item, "mem.jsonl", index) for index, item in enumerate(items, start=1)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# One row per format, and the records it must give for each kind (None: the kind is not available).
CASES = {
    "messages": (
        {
            "messages": [
                {"role": "system", "content": " Be brief. "},
                {"role": "user", "content": "Hi\n"},
                {"role": "assistant", "content": " Hello! "},
            ],
            "id": 7,
        },
        {
            "sft": {"messages": [system("Be brief."), user("Hi"), assistant("Hello!")]},
            "pairs": None,
            "prompts": {"prompt": [system("Be brief."), user("Hi")], "id": 7},
        },
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
                {"from": "human", "value": "and 3+3?"},
                {"from": "gpt", "value": "6"},
            ],
            "system": "You are a calculator.",
        },
        {
            "sft": {
                "messages": [
                    system("You are a calculator."),
                    user("2+2?"),
                    assistant("4"),
                    user("and 3+3?"),
                    assistant("6"),
                ]
            },
            "pairs": None,
            "prompts": {"prompt": [system("You are a calculator."), user("2+2?"), assistant("4"), user("and 3+3?")]},
        },
    ),
    "prompt_completion": (
        {"prompt": "Capital of France?", "completion": " Paris.", "source": "quiz"},
        {
            "sft": {"messages": [user("Capital of France?"), assistant("Paris.")]},
            "pairs": None,
            "prompts": {"prompt": [user("Capital of France?")], "completion": " Paris.", "source": "quiz"},
        },
    ),
    "alpaca": (
        {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"},
        {
            "sft": {"messages": [user("Translate to German.\n\nGood morning"), assistant("Guten Morgen")]},
            "pairs": None,
            "prompts": {"prompt": [user("Translate to German.\n\nGood morning")], "output": "Guten Morgen"},
        },
    ),
    "dolly": (
        {
            "instruction": "Who wrote it?",
            "context": "Hamlet was written by Shakespeare.",
            "response": "Shakespeare",
            "category": "closed_qa",
        },
        {
            "sft": {
                "messages": [user("Who wrote it?\n\nHamlet was written by Shakespeare."), assistant("Shakespeare")]
            },
            "pairs": None,
            "prompts": {
                "prompt": [user("Who wrote it?\n\nHamlet was written by Shakespeare.")],
                "response": "Shakespeare",
                "category": "closed_qa",
            },
        },
    ),
    "hh_rlhf": (
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?\n\nHuman: Tell a joke\n\nAssistant: "
            "Why did the chicken cross the road?  ",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?\n\nHuman: Tell a joke\n\nAssistant:"
            " No.",
        },
        {
            "sft": {
                "messages": [
                    user("Hi there"),
                    assistant("Hello, how can I help?"),
                    user("Tell a joke"),
                    assistant("Why did the chicken cross the road?"),
                ]
            },
            "pairs": {
                "prompt": [user("Hi there"), assistant("Hello, how can I help?"), user("Tell a joke")],
                "chosen": "Why did the chicken cross the road?",
                "rejected": "No.",
            },
            "prompts": {"prompt": [user("Hi there"), assistant("Hello, how can I help?"), user("Tell a joke")]},
        },
    ),
    "preference": (
        {"prompt": "Is water wet?", "chosen": "Yes, in the everyday sense.", "rejected": "Bananas.", "score": 3},
        {
            "sft": {"messages": [user("Is water wet?"), assistant("Yes, in the everyday sense.")]},
            "pairs": {
                "prompt": [user("Is water wet?")],
                "chosen": "Yes, in the everyday sense.",
                "rejected": "Bananas.",
                "score": 3,
            },  # a pair's own fields are kept, as a prompt's are
            "prompts": {
                "prompt": [user("Is water wet?")],
                "chosen": "Yes, in the everyday sense.",
                "rejected": "Bananas.",
                "score": 3,
            },
        },
    ),
    "piqa": (
        {
            "goal": "Dry wet shoes",
            "sol1": "Put them in the oven at 500F.",
            "sol2": "Stuff them with newspaper.",
            "label": 1,
        },
        {
            "sft": {"messages": [user("Dry wet shoes"), assistant("Stuff them with newspaper.")]},
            "pairs": {
                "prompt": [user("Dry wet shoes")],
                "chosen": "Stuff them with newspaper.",
                "rejected": "Put them in the oven at 500F.",
            },
            "prompts": {
                "prompt": [user("Dry wet shoes")],
                "sol1": "Put them in the oven at 500F.",
                "sol2": "Stuff them with newspaper.",
                "label": 1,
            },
        },
    ),
    "ranked": (  # K = 2 here (one pair); K-wise expansion is tested in tests/methods/test_reward_ranking.py
        {"prompt": "Best color?", "responses": ["grey", "blue"], "scores": [0.1, 0.9], "id": 3},
        {
            "sft": {"messages": [user("Best color?"), assistant("blue")]},
            "pairs": {"prompt": [user("Best color?")], "chosen": "blue", "rejected": "grey", "id": 3},
            "prompts": {"prompt": [user("Best color?")], "id": 3},
        },
    ),
    "unpaired": (  # KTO feedback: SFT refuses it (tests/data/test_unpaired.py)
        {"prompt": "Capital of France?", "completion": " Lyon.", "label": False, "weight": 2},
        {
            "sft": None,
            "pairs": None,
            "prompts": {"prompt": [user("Capital of France?")], "completion": " Lyon.", "label": False, "weight": 2},
            "unpaired": {"prompt": [user("Capital of France?")], "completion": "Lyon.", "label": False, "weight": 2},
        },
    ),
    "text": (  # plain text (language modeling): every token trained, other kinds refused (tests/data/test_text_rows.py)
        {"text": "  Plain text, kept as written.\n", "url": "https://example.org/1"},
        {"sft": {"text": "  Plain text, kept as written.\n"}, "pairs": None, "prompts": None},
    ),
    "prompt_only": (
        {"prompt": "def add(a, b):", "test": "assert add(1, 2) == 3", "entry_point": "add"},
        {
            "sft": None,
            "pairs": None,
            "prompts": {"prompt": [user("def add(a, b):")], "test": "assert add(1, 2) == 3", "entry_point": "add"},
        },
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_format_converts_to_each_kind(name: str, kind: str) -> None:
    row, expected = CASES[name]
    if expected.get(kind) is None:  # a kind a case does not list is one its format cannot provide
        with pytest.raises(DataError, match=rf"format '{name}' cannot provide '{kind}'"):
            convert(rows_of(row), kind=kind, format=name)
        return
    records, report = convert(rows_of(row), kind=kind, format=name)
    assert records == [expected[kind]]
    assert (report.format, report.kind, report.rows_in, report.records_out, report.filtered) == (name, kind, 1, 1, {})


@pytest.mark.parametrize("name", sorted(CASES) + ["alpaca_seed"])
def test_auto_detection(name: str) -> None:
    row = CASES[name][0] if name in CASES else {"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}]}
    assert detect_format(rows_of(row, row)) == name
    assert FORMATS[name].matches(row)
    assert [other for other, fmt in FORMATS.items() if fmt.matches(row)] == [name]


def test_every_registered_format_is_tested() -> None:
    assert set(FORMATS) == set(CASES) | {"alpaca_seed"}
    assert {
        "messages",
        "sharegpt",
        "prompt_completion",
        "alpaca",
        "dolly",
        "hh_rlhf",
        "preference",
        "piqa",
        "alpaca_seed",
    } <= set(FORMATS)


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
