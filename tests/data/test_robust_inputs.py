"""Inputs a hostile user tries: lengths that truncate everything away, pairs that collapse, rows with different
extra fields, empty files, packing for prompts — each counted and refused (or skipped when asked), naming files."""

from __future__ import annotations

import json
import re

import pytest

from rlft.data import PreferenceDataModule
from rlft.data.collate import Collator
from rlft.data.errors import DataError
from rlft.models import load_tokenizer

PAIRS = "rlft/assets/sample_pairs.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def _module(tokenizer, kind, path=PAIRS, **kwargs):
    kwargs = {"batch_size": 4, "max_length": 128, **kwargs}
    dm = PreferenceDataModule(path=path, **kwargs).attach(kind, tokenizer)
    dm.setup("fit")
    return dm


def test_truncation_that_makes_chosen_equal_rejected_is_refused_or_counted(tokenizer):
    with pytest.raises(DataError) as error:
        _module(tokenizer, "pairs", max_length=16)
    message = str(error.value)
    assert "chosen == rejected after truncation" in message and "sample_pairs.jsonl:" in message
    assert "max_length" in message and "skip_invalid" in message
    dm = _module(tokenizer, "pairs", max_length=16, skip_invalid=True)
    collapsed = dm.stats["train"]["with chosen == rejected after truncation"]
    assert collapsed > 0 and dm.stats["train"]["examples"] + collapsed <= 64
    assert all(e["chosen_ids"] != e["rejected_ids"] for e in dm.train_set)


def test_examples_with_nothing_left_to_train_on_are_unusable(tokenizer):
    from rlft.data.datamodule import _unusable

    assert _unusable("sft", {"labels": [-100, -100]}) == "with no trained tokens left after truncation"
    assert (
        _unusable("pairs", {"chosen_ids": [1], "rejected_ids": [2], "chosen_labels": [-100], "rejected_labels": [-100]})
        == "with no reply tokens left after truncation"
    )
    assert _unusable("prompts", {"prompt_ids": []}) == "with an empty prompt after truncation"
    # the smallest length allowed still trains on something in every shipped example
    dm = _module(tokenizer, "sft", "rlft/assets/sample_sft.jsonl", max_length=2)
    assert all(any(t != -100 for t in e["labels"][1:]) for e in dm.train_set)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_length", 0, ">= 2"),
        ("max_length", -5, ">= 2"),
        ("batch_size", 0, ">= 1"),
        ("val_fraction", 1.0, "[0, 1)"),
        ("max_prompt_length", 0, ">= 1"),
        ("limit", 0, ">= 1"),
        ("num_workers", -1, ">= 0"),
    ],
)
def test_numeric_options_are_range_checked(name, value, expected):
    with pytest.raises(ValueError, match=rf"data\.{name} must be .*{re.escape(expected)}"):
        PreferenceDataModule(path=PAIRS, **{name: value})


def test_empty_files_are_named(tokenizer, tmp_path):
    empty = tmp_path / "val.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"{empty}: no rows"):
        _module(tokenizer, "pairs", val_path=str(empty))
    with pytest.raises(DataError, match=rf"{empty}: no rows"):
        _module(tokenizer, "pairs", path=str(empty))


def test_prompt_rows_with_different_extra_fields_keep_theirs(tokenizer, tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": "Name a colour.", "topic": "art"},
        {"prompt": "Say hi."},
        {"prompt": "What is 3+3?", "answer": "6", "topic": "math"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = _module(tokenizer, "prompts", str(path), val_fraction=0.0, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.fields["answer"] == ["4", None, None, "6"]
    assert batch.fields["topic"] == [None, "art", None, "math"]
    assert "row" not in batch.fields  # where a row came from is not a reward field


def test_packing_is_refused_where_the_method_cannot_honour_it(tokenizer):
    with pytest.raises(DataError, match="packing: true is not possible for prompts"):
        _module(tokenizer, "prompts", "rlft/assets/sample_prompts.jsonl", packing=True)


def test_batch_rows_are_known_for_error_messages(tokenizer):
    dm = _module(tokenizer, "sft", "rlft/assets/sample_sft.jsonl", val_fraction=0.0, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert dm.rows_of(batch) == [f"rlft/assets/sample_sft.jsonl:{i}" for i in range(1, 5)]
    assert isinstance(Collator("sft", 0).recent_rows, dict)


class _FakeTrainer:
    """Just what the resume skip reads: a restart on the last batch of an epoch."""

    def __init__(self, ready):
        from types import SimpleNamespace

        self.world_size, self.limit_train_batches = 1, None
        progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
        self.fit_loop = SimpleNamespace(restarting=True, epoch_loop=SimpleNamespace(batch_progress=progress))


def test_resume_on_an_epoch_boundary_does_not_skip_the_next_epoch(tokenizer):
    dm = _module(tokenizer, "sft", "rlft/assets/sample_sft.jsonl", val_fraction=0.0)
    per_epoch = -(-len(dm.train_set) // 4)
    for ready, skip in ((3, 3), (per_epoch, 0)):
        dm.trainer = _FakeTrainer(ready)
        assert dm._consumed_batches() == skip
