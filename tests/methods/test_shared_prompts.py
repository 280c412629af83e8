"""Segmented attention and prompt sharing give the numbers (and gradients) of the plain layouts."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from rlft.data import PairBatch, PreferenceDataModule, Tokens
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.attention import SEGMENTED_SDPA, causal_segments, segmented_attention, segmented_inputs
from rlft.models.modes import disable_dropout as zero_dropout
from rlft.models.scoring import pair_logps, shared_prompt_layout

PAIRS = "rlft/assets/sample_pairs.jsonl"


def _pair_batches(name: str, packing: bool, limit: int = 8) -> list[dict]:
    dm = PreferenceDataModule(
        path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, packing=packing, shuffle=False, limit=limit
    )
    dm.attach("pairs", load_tokenizer(name)).setup("fit")
    return list(dm.train_dataloader())


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gpt2", "tiny-opt"]
)
def test_segments_attend_like_separate_sequences(name):
    model = load_model(name).eval()
    assert segmented_attention(model)
    assert model.config._attn_implementation == SEGMENTED_SDPA
    torch.manual_seed(0)
    lengths = [9, 1, 14, 5]
    sequences = [torch.randint(3, 200, (n,)) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        separate = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in sequences])
        packed = model(**segmented_inputs(torch.cat(sequences), positions, causal_segments(lengths))).logits[0]
        # without segments the same call is one causal row: later sequences see earlier ones
        plain = model(**segmented_inputs(torch.cat(sequences), positions, None)).logits[0]
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain[10:], separate[10:], atol=1e-4)


def test_models_on_other_attention_keep_it():
    model = load_model("tiny-llama", attn_implementation="eager")
    assert not segmented_attention(model)
    assert model.config._attn_implementation == "eager"


def test_shared_layout_runs_each_prompt_once():
    batch = _pair_batches("tiny-llama", packing=False)[0]
    layout = shared_prompt_layout(batch)
    total = int(batch.side("chosen").attention_mask.sum() + batch.side("rejected").attention_mask.sum())
    prompts = int(batch.prompt_lengths.sum())
    assert layout.inputs["input_ids"].shape[1] <= total - prompts
    assert all(mask is not None for _, _, mask in layout.inputs["rlft_segments"])


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma", "tiny-gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_shared_prompts_give_the_padded_logps_and_gradients(name, checkpointing):
    model = load_model(name, lora=LoraSettings(r=4, dropout=0.0), gradient_checkpointing=checkpointing).train()
    zero_dropout(model)  # as the preference methods do: GPT-2 has dropout in its config
    padded = _pair_batches(name, packing=False)[0]
    packed = _pair_batches(name, packing=True)[0]
    results = []
    for batch, share in ((padded, False), (padded, True), (packed, True), (packed, False)):
        model.zero_grad()
        logps = pair_logps(model, batch, share_prompts=share)
        (logps.chosen.sum() - 2 * logps.rejected.sum()).backward()
        results.append((logps, _grads(model)))
    reference, reference_grads = results[0]
    for logps, grads in results[1:]:
        torch.testing.assert_close(logps.chosen, reference.chosen, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(logps.rejected, reference.rejected, atol=1e-4, rtol=1e-5)
        assert torch.equal(logps.chosen_tokens, reference.chosen_tokens)
        assert torch.equal(logps.rejected_tokens, reference.rejected_tokens)
        for g, r in zip(grads, reference_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-3)


def test_pairs_that_start_differently_are_scored_apart():
    model = load_model("tiny-llama").eval()
    batch = _pair_batches("tiny-llama", packing=False)[0]
    # make the first pair's rejected sequence begin with another token: nothing is shared for that pair
    first = batch.side("rejected").attention_mask[0].nonzero()[0, 0]
    batch.side("rejected").input_ids[0, first] = (batch.side("chosen").input_ids[0, first] + 1) % 200
    layout = shared_prompt_layout(batch)
    assert layout.inputs["rlft_segments"][0][2] is None and layout.inputs["rlft_segments"][1][2] is None
    with torch.no_grad():
        plain, shared = pair_logps(model, batch), pair_logps(model, batch, share_prompts=True)
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["DPO", "ORPO", "SimPO"])
def test_methods_train_the_same_with_and_without_shared_prompts(tmp_path, fit_losses, method):
    import rlft.methods

    losses = {}
    for share in (False, True):
        L.seed_everything(0)
        module = getattr(rlft.methods, method)(
            model="tiny-llama",
            lora=LoraSettings(r=4, dropout=0.0),
            share_prompts=share,
            output_dir=str(tmp_path / "out"),
        )
        data = PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, shuffle=False, limit=12)
        losses[share] = fit_losses(module, data, steps=3)
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def _left_padded(batch: PairBatch) -> PairBatch:
    tokens = batch.sequences
    shifts = (tokens.attention_mask.shape[1] - tokens.attention_mask.sum(1)).tolist()
    rolled = {
        key: torch.stack([row.roll(shift) for row, shift in zip(getattr(tokens, key), shifts)])
        for key in ("input_ids", "attention_mask", "labels")
    }
    return replace(batch, sequences=Tokens(**rolled))


def test_reward_model_scores_every_layout_alike(fit_losses):
    from rlft.methods import RewardModel

    module = RewardModel(model="tiny-llama", lora=LoraSettings(r=4, dropout=0.0))
    torch.nn.init.normal_(module.model.head.weight, std=0.5)  # the zero-initialised head would score everything 0
    zero_dropout(module.model)
    padded = _pair_batches("tiny-llama", packing=False)[0]
    packed = _pair_batches("tiny-llama", packing=True)[0]
    results = []
    for batch, share in ((padded, False), (padded, True), (packed, True), (packed, False)):
        module.hparams.share_prompts = share
        module.model.zero_grad()
        chosen, rejected = module.pair_rewards(batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen, rejected, _grads(module.model)))
    for chosen, rejected, grads in results[1:]:
        torch.testing.assert_close(chosen, results[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rejected, results[0][1], atol=1e-4, rtol=1e-4)
        for g, r in zip(grads, results[0][2]):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-3)
    assert results[0][0].abs().min() > 0  # non-trivial rewards
    module.hparams.share_prompts = False
    with torch.no_grad():  # left padding (as a user's own collator might do) scores the same
        chosen, rejected = module.pair_rewards(_left_padded(padded))
    torch.testing.assert_close(chosen, results[0][0].detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rejected, results[0][1].detach(), atol=1e-4, rtol=1e-4)

    # packed pairs train (they used to be refused), starting from the padded batch's loss
    with torch.no_grad():
        padded_loss = float(module.compute_loss(padded)[0])
    data = PreferenceDataModule(
        path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, packing=True, shuffle=False, limit=8
    )
    losses = fit_losses(module, data, steps=2)
    assert len(losses) == 2 and losses[0] == pytest.approx(padded_loss, abs=1e-5)
