"""Every input format converts to each record kind it supports, with exact expected records (one table of cases).

Format-specific rules, detection errors, dedupe and the real data files: test_format_rules.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import FORMATS, KINDS, convert, detect_format  # noqa: E402
from rlft.data.sources import Row  # noqa: E402


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
