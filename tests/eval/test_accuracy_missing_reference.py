"""rlft eval accuracy: an item without an answer (None, NaN, a blank CSV cell) stops the evaluation before any
generation, naming the item and field, or is skipped and counted when asked; never scored against "None"."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rlft.eval.accuracy import generative_accuracy, multiple_choice_accuracy
from rlft.eval.data import load_raw_rows
from rlft.rl.answers import MissingReferenceError


class _Echo:
    """Answers every question with the text "None" (what str(None) would make the reference)."""

    def __init__(self):
        self.asked = []

    def generate(self, prompts, settings=None):
        self.asked += prompts
        return [["None nan"] for _ in prompts]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_a_missing_answer_in_any_file_format_is_an_error_naming_the_item(tmp_path, suffix):
    path = tmp_path / f"items.{suffix}"
    frame = pd.DataFrame({"question": ["a?", "b?"], "answer": ["None", None]})
    {
        "parquet": frame.to_parquet,
        "csv": lambda p: frame.to_csv(p, index=False),
        "jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
    }[suffix](path)
    rows = load_raw_rows(path)
    generator = _Echo()
    with pytest.raises(MissingReferenceError, match=r"rlft eval accuracy: row 1 has no reference in field 'answer'"):
        generative_accuracy(generator, rows, extractor="full")
    assert generator.asked == []  # refused before spending any generation


def test_skip_leaves_the_item_out_and_counts_it():
    items = [
        {"question": "a?", "answer": "None nan"},
        {"question": "b?", "answer": math.nan},
        {"prompt": "c?", "answer": None},
    ]
    result = generative_accuracy(_Echo(), items, extractor="full", missing="skip")
    assert result["n"] == 1 and result["skipped_missing_reference"] == 2 and result["accuracy"] == 1.0
    with pytest.raises(ValueError, match="missing must be one of"):
        generative_accuracy(_Echo(), items, missing="drop")


@pytest.mark.parametrize(
    "row",
    [
        {"goal": "g", "sol1": "a", "sol2": "b", "label": math.nan},
        {"question": "q", "choices": ["a", "b"], "answer": None},
    ],
)
def test_a_missing_multiple_choice_label_names_the_row(row):
    with pytest.raises(MissingReferenceError, match=r"row 1 has no reference in field '(label|answer)'"):
        multiple_choice_accuracy(None, None, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, row])
