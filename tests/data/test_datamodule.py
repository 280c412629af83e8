"""PreferenceDataModule: one module serves SFT examples, pairs and prompts; splits are deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from rlft.data import PairBatch, PreferenceDataModule, SFTBatch
from rlft.logprobs import IGNORE_INDEX
from rlft.models import load_tokenizer

PAIRS = "rlft/assets/sample_pairs.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-qwen2")


def _module(tokenizer, kind, path=PAIRS, **kwargs):
    dm = PreferenceDataModule(path=path, batch_size=4, max_length=128, **kwargs).attach(kind, tokenizer)
    dm.setup("fit")
    return dm


def test_same_pairs_file_serves_every_kind(tokenizer, repo_root):
    path = str(repo_root / PAIRS)
    rows = sum(1 for _ in open(path))
    sft = _module(tokenizer, "sft", path)
    batch = next(iter(sft.train_dataloader()))
    assert isinstance(batch, SFTBatch) and not batch.tokens.packed and batch.fields == {}
    assert (batch.tokens.labels != IGNORE_INDEX).any() and (batch.tokens.labels == IGNORE_INDEX).any()

    pairs = _module(tokenizer, "pairs", path)
    batch = next(iter(pairs.train_dataloader()))
    assert isinstance(batch, PairBatch)
    assert batch.side("chosen").input_ids.shape == batch.side("rejected").input_ids.shape  # one width, one forward
    assert len(pairs.train_set) + len(pairs.val_set) == rows

    prompts = _module(tokenizer, "prompts", path)
    batch = next(iter(prompts.train_dataloader()))
    mask = batch.attention_mask
    assert (mask[:, -1] == 1).all()  # left padded: every prompt ends at the right edge
    assert isinstance(batch.prompts[0], list) and batch.prompts[0][-1]["role"] == "user"


def test_dynamic_padding_pads_to_the_longest_in_batch(tokenizer):
    dm = _module(tokenizer, "sft", "rlft/assets/sample_sft.jsonl")
    for batch in dm.train_dataloader():
        tokens = batch.tokens
        lengths = tokens.attention_mask.sum(1)
        assert tokens.input_ids.shape[1] == lengths.max()
        assert (tokens.input_ids[tokens.attention_mask == 0] == tokenizer.pad_token_id).all()


def test_split_is_deterministic_and_disjoint(tokenizer):
    a = _module(tokenizer, "pairs", seed=1, val_fraction=0.25)
    b = _module(tokenizer, "pairs", seed=1, val_fraction=0.25)
    c = _module(tokenizer, "pairs", seed=2, val_fraction=0.25)
    key = lambda e: tuple(e["prompt_ids"] + e["chosen_ids"])  # noqa: E731
    assert [key(e) for e in a.val_set] == [key(e) for e in b.val_set]
    assert {key(e) for e in a.val_set} != {key(e) for e in c.val_set}
    assert not {key(e) for e in a.val_set} & {key(e) for e in a.train_set}
    assert len(a.val_set) == 16


def test_val_path_and_limits(tokenizer):
    dm = _module(tokenizer, "pairs", val_path=PAIRS, limit=10, val_limit=3)
    assert len(dm.train_set) == 10 and len(dm.val_set) == 3


def test_truncation_is_counted(tokenizer, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "word " * 400, "chosen": "yes", "rejected": "no"},
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level("WARNING"):
        dm = _module(tokenizer, "pairs", str(path), val_fraction=0.0)
    assert dm.stats["train"]["truncated"] == 1
    assert "1 of 2 examples were longer than max_length=128" in caplog.text


def test_invalid_rows_stop_with_file_line_field_or_are_counted(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "c", "rejected": "d"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        _module(tokenizer, "pairs", str(path), val_fraction=0.0)
    dm = _module(tokenizer, "pairs", str(path), val_fraction=0.0, skip_invalid=True)
    assert len(dm.train_set) == 2


def test_kind_the_data_cannot_provide_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="(?i)pair|rejected"):
        _module(tokenizer, "pairs", "rlft/assets/sample_sft.jsonl")


def test_resumed_sampler_continues_the_same_order(tokenizer):
    dm = _module(tokenizer, "sft", "rlft/assets/sample_sft.jsonl")
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip = 8
    assert list(sampler) == full[8:]
    assert list(sampler) == full  # the skip applies once
    sampler.set_epoch(4)
    assert list(sampler) != full and sorted(sampler) == sorted(full)


def test_collated_pair_labels_cover_only_replies(tokenizer):
    dm = _module(tokenizer, "pairs")
    batch = next(iter(dm.train_dataloader()))
    chosen, rejected = batch.side("chosen"), batch.side("rejected")
    for i, prompt_len in enumerate(batch.prompt_lengths.tolist()):
        labels = chosen.labels[i]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        assert (labels[prompt_len:] != IGNORE_INDEX).any()
        assert torch.equal(chosen.input_ids[i, :prompt_len], rejected.input_ids[i, :prompt_len])


@pytest.mark.parametrize("packing", [False, True])
def test_pair_records_keep_their_own_fields_into_the_batch(tokenizer, tmp_path, packing):
    rows = [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "margin": 2.0, "weight": 1, "source": "a"},
        {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Hi.", "margin": 0.5, "weight": 3},
        {"prompt": "Count", "chosen": "1 2 3", "rejected": "3 2 1", "margin": 1.5, "weight": 2, "source": "b"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = _module(tokenizer, "pairs", str(path), val_fraction=0.0, shuffle=False, packing=packing, cache=False)
    batch = next(iter(dm.train_dataloader()))
    # numbers become [B] float tensors (in the batch's pair order); anything else a list, None where a pair lacks it
    torch.testing.assert_close(batch.field("margin"), torch.tensor([2.0, 0.5, 1.5]))
    torch.testing.assert_close(batch.field("weight"), torch.tensor([1.0, 3.0, 2.0]))
    assert batch.fields["source"] == ["a", None, "b"]
    assert set(batch.fields) == {"margin", "weight", "source"}
    with pytest.raises(ValueError, match="'source' must be a number on every row"):
        batch.field("source")
    with pytest.raises(TypeError, match=r"PairBatch is not a dict: read batch.field\('margin'\)"):
        batch["margin"]  # code written for the dict batches points at what replaced them
    # the data's own fields never displace what the model reads
    assert batch.prompt_lengths.shape == (3,)
