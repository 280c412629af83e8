"""Padding-free packing: identical per-example losses, no attention across examples, clear refusal otherwise."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlft.data import PreferenceDataModule, Tokens
from rlft.logprobs import IGNORE_INDEX, gather_logps
from rlft.methods import SFT
from rlft.models import load_model, load_tokenizer, supports_packing


def _batches(name: str, kind: str, packing: bool, path: str) -> list:
    dm = PreferenceDataModule(path=path, batch_size=4, max_length=96, val_fraction=0.0, packing=packing, limit=8)
    dm.attach(kind, load_tokenizer(name)).setup("fit")
    return list(dm.train_dataloader())


def _per_sequence_logps(model, tokens: Tokens) -> list[float]:
    logits = model(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        position_ids=tokens.position_ids,
        use_cache=False,
    ).logits
    labels = tokens.labels[:, 1:]
    token = gather_logps(logits[:, :-1], labels) * (labels != IGNORE_INDEX)
    if not tokens.packed:
        return token.sum(-1).tolist()
    sums, start = [], 0
    for length in tokens.seq_lengths.tolist():  # a segment's labels sit one position left after the shift
        sums.append(float(token[0, max(start - 1, 0) : start + length - 1].sum()))
        start += length
    return sums


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma", "tiny-gpt2"])
def test_packed_sft_losses_equal_padded_per_example(name):
    model = load_model(name).eval()
    padded = _batches(name, "sft", False, "rlft/assets/sample_sft.jsonl")
    packed = _batches(name, "sft", True, "rlft/assets/sample_sft.jsonl")
    assert all(b.tokens.input_ids.shape[0] == 1 for b in packed)
    assert sum(b.tokens.real_tokens() for b in packed) == sum(int(b.tokens.attention_mask.sum()) for b in padded)
    with torch.no_grad():
        for a, b in zip(padded, packed):
            torch.testing.assert_close(
                torch.tensor(_per_sequence_logps(model, a.tokens)),
                torch.tensor(_per_sequence_logps(model, b.tokens)),
                atol=1e-4,
                rtol=1e-5,
            )


def test_packed_pairs_keep_chosen_then_rejected_order():
    padded = _batches("tiny-llama", "pairs", False, "rlft/assets/sample_pairs.jsonl")[0]
    packed = _batches("tiny-llama", "pairs", True, "rlft/assets/sample_pairs.jsonl")[0]
    lengths = packed.sequences.seq_lengths.tolist()
    chosen, rejected = padded.side("chosen"), padded.side("rejected")
    expected = chosen.attention_mask.sum(1).tolist() + rejected.attention_mask.sum(1).tolist()
    assert lengths == expected
    first = chosen.input_ids[0, : lengths[0]]
    assert torch.equal(packed.sequences.input_ids[0, : lengths[0]], first)


def test_one_example_cannot_change_another_when_packed():
    model = load_model("tiny-llama").eval()
    a, b, other = torch.arange(5, 12), torch.arange(20, 26), torch.arange(60, 67)
    positions = torch.tensor([list(range(7)) + list(range(6))])
    with torch.no_grad():
        ab = model(input_ids=torch.cat([a, b])[None], position_ids=positions, use_cache=False).logits
        cb = model(input_ids=torch.cat([other, b])[None], position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(ab[0, 7:], cb[0, 7:])  # b's outputs do not depend on what precedes it in the row
    assert not torch.allclose(ab[0, :7], cb[0, :7])


def test_packing_is_refused_for_a_model_that_would_mix_examples(tmp_path):
    # OPT ignores restarting position_ids in transformers' packed masks; only segmented attention keeps it apart
    assert not supports_packing(load_model("tiny-opt"))
    assert supports_packing(load_model("tiny-llama"))
    module = SFT(model="tiny-opt", lora=None, attn_implementation="eager")
    data = PreferenceDataModule(path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=64, packing=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="packing"):
        trainer.fit(module, data)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_sft_trains_packed_with_the_same_first_loss(tmp_path, name):
    losses = {}
    for packing in (False, True):
        L.seed_everything(0)
        module = SFT(model=name, lora=None)
        data = PreferenceDataModule(
            path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=96, val_fraction=0.0, packing=packing
        )
        data.attach("sft", module.tokenizer).setup("fit")
        batch = next(iter(data.train_dataloader()))
        module.eval()  # OPT's dropout would draw different masks for the two layouts
        with torch.no_grad():
            losses[packing] = float(module.compute_loss(batch)[0])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_packed_pairs_score_like_padded_pairs(name):
    from rlft.models.scoring import batch_keys, pair_logps

    model = load_model(name).eval()
    padded = _batches(name, "pairs", False, "rlft/assets/sample_pairs.jsonl")[:2]
    packed = _batches(name, "pairs", True, "rlft/assets/sample_pairs.jsonl")[:2]
    with torch.no_grad():
        for a, b in zip(padded, packed):
            pa, pb = pair_logps(model, a), pair_logps(model, b)
            torch.testing.assert_close(pa.chosen, pb.chosen, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(pa.rejected, pb.rejected, atol=1e-4, rtol=1e-5)
            assert torch.equal(pa.chosen_tokens, pb.chosen_tokens) and torch.equal(
                pa.rejected_tokens, pb.rejected_tokens
            )
            assert batch_keys(a) == batch_keys(b)


@pytest.mark.parametrize("reference", ["adapter", "precomputed"])
def test_dpo_trains_on_packed_pairs_with_the_padded_first_loss(tmp_path, fit_losses, reference):
    from rlft.methods import DPO
    from rlft.models import LoraSettings

    losses = {}
    for packing in (False, True):
        L.seed_everything(0)
        module = DPO(
            model="tiny-llama",
            lora=LoraSettings(r=4, dropout=0.0),
            reference=reference,
            ref_cache_path=str(tmp_path / f"ref{packing}.pt"),
            output_dir=str(tmp_path / "out"),
        )
        data = PreferenceDataModule(
            path="rlft/assets/sample_pairs.jsonl",
            batch_size=4,
            max_length=96,
            val_fraction=0.0,
            packing=packing,
            shuffle=False,
            limit=8,
        )
        losses[packing] = fit_losses(module, data, steps=2)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
