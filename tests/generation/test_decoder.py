"""rlft's rollout decoder against ``model.generate`` and against teacher-forced forwards of its own samples."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlft.generation.decoder import decode, merged_adapter, sample_tokens
from rlft.generation.settings import ONLINE_SAMPLING, DecoderSettings, SamplingSettings
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.attention import segmented_attention
from rlft.models.scoring import position_ids_from_mask
from rlft.rl.logps import token_logps
from rlft.rl.rollout import collect_rollout, generate_responses
from tests.rl.test_rollout import prompt_batch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: zero B would make merging a no-op
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    return model, tokenizer


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (7, 0.3), (0, 1.0)])
def test_truncation_keeps_the_tokens_generate_keeps(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    allowed = torch.isfinite(expected)
    for seed in range(20):
        torch.manual_seed(seed)
        picked = sample_tokens(logits, temperature=1.0, top_k=top_k, top_p=top_p)
        assert allowed.gather(1, picked[:, None]).all()
    if top_p < 1 or top_k:  # the truncation must remove something, or the check above proves nothing
        assert not allowed.all()
    # every allowed token is reachable: its mass is not zeroed by the truncation
    torch.manual_seed(0)
    draws = torch.stack([sample_tokens(logits[:1], temperature=1.0, top_k=top_k, top_p=top_p) for _ in range(3000)])
    assert set(draws.flatten().tolist()) <= set(allowed[0].nonzero().flatten().tolist())


def test_sampling_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    torch.manual_seed(0)
    draws = sample_tokens(logits, temperature=0.7)
    frequencies = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = (logits[0] / 0.7).softmax(-1).double()
    # 20,000 draws: the standard error of each frequency is below 0.004
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.012)
    assert frequencies[4] == 0  # a masked token is never drawn


def test_a_draw_at_the_top_of_the_cdf_picks_the_last_possible_token():
    # a uniform that rounds up to the total mass in float32 must still land on a token with probability > 0: the
    # last entries here are masked, and without the guard searchsorted would return an index past them
    logits = torch.tensor([[0.5, 1.0, 2.0, float("-inf"), float("-inf")]]).repeat(3, 1)
    uniforms = torch.tensor([1 - 1e-12, 1 - 1e-9, 0.0], dtype=torch.float64)  # the first two become 1.0 in float32
    assert torch.equal(sample_tokens(logits, temperature=1.0, uniforms=uniforms), torch.tensor([2, 2, 0]))


def test_greedy_decoding_equals_generate_on_ragged_prompts(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    common = dict(max_new_tokens=12, temperature=0.0)
    ours = generate_responses(
        model,
        tokenizer,
        batch.input_ids,
        batch.attention_mask,
        replace(ONLINE_SAMPLING, **common),
        DecoderSettings(backend="rlft"),
        group_size=2,
    )
    theirs = generate_responses(
        model,
        tokenizer,
        batch.input_ids,
        batch.attention_mask,
        replace(ONLINE_SAMPLING, **common),
        DecoderSettings(backend="hf", merge_adapter=False),
        group_size=2,
    )
    width = min(ours[0].shape[1], theirs[0].shape[1])
    assert torch.equal(ours[1][:, :width], theirs[1][:, :width])
    assert torch.equal(ours[0][:, :width] * ours[1][:, :width], theirs[0][:, :width] * theirs[1][:, :width])


def test_shared_prefill_samples_what_separate_prefill_samples(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    common = dict(max_new_tokens=16, stop_ids=stops, pad_id=pad, temperature=1.3, top_p=0.95)
    torch.manual_seed(7)
    shared = decode(model, ids, mask, group_size=4, **common)
    torch.manual_seed(7)
    separate = decode(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), **common)
    assert torch.equal(shared, separate)
    assert len({tuple(row.tolist()) for row in shared[:4]}) > 1  # the group's samples differ: it really sampled


@pytest.mark.parametrize("decode_dtype", [None, torch.bfloat16])
def test_prefill_multiplies_the_head_without_a_batch_expanded_copy(tiny, decode_dtype):
    """The prefill's last-position logits come from a [B, H] matrix times the head: the model's logits_to_keep=1
    slice made torch.matmul expand the head over the batch ([B, H, V], larger than the head itself)."""
    from rlft.generation.decoder import decoding_twin

    model, tokenizer = tiny
    decoder = model if decode_dtype is None else decoding_twin(model, decode_dtype)
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    head = model.get_base_model().lm_head.weight
    largest = LargestOutput()
    with largest, merged_adapter(model):
        sampled = decode(
            decoder,
            ids,
            mask,
            max_new_tokens=1,
            stop_ids=[tokenizer.eos_token_id],
            pad_id=tokenizer.pad_token_id,
            temperature=0.0,
        )
    assert 0 < largest.numel <= head.numel()  # the head's own transpose is the largest
    with torch.no_grad(), merged_adapter(model):  # the first token: greedy over the full forward's last logits
        expected = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert torch.equal(sampled[:, 0], expected[:, -1].argmax(-1))


class LargestOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # views too: bf16's bmm copies the expanded head inside its kernel
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_merged_adapter_is_the_same_function_and_restores_the_weights_exactly(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with merged_adapter(model) as merged:
            inside = model(input_ids=ids, attention_mask=mask).logits
            name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
            changed = not torch.equal(dict(model.named_parameters())[name], before[name])
        after = model(input_ids=ids, attention_mask=mask).logits
    assert merged and changed
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, reference)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merged_adapter_refuses_what_it_cannot_merge_exactly():
    plain = load_model("tiny-llama")
    with merged_adapter(plain) as merged:
        assert not merged
    saved = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, modules_to_save=["lm_head"]))
    with merged_adapter(saved) as merged:  # disabling the adapter would also swap the trained lm_head out
        assert not merged


def test_rollout_logps_are_the_decoding_distribution(tiny):
    # greedy tokens are the argmax of the teacher-forced logits at every position: positions and cache agree with
    # the training forward, so the first update's importance ratio is exactly 1
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    rollout = collect_rollout(model, tokenizer, batch, SamplingSettings(max_new_tokens=10), group_size=2)
    with torch.no_grad():
        length = rollout.response_ids.shape[1]
        out = model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0),
        )
        argmax = out.logits[:, -length - 1 : -1].argmax(-1)
        logps, _, _ = token_logps(model, rollout.input_ids, rollout.attention_mask, length)
    real = rollout.response_mask.bool()
    assert torch.equal(argmax[real], rollout.response_ids[real])
    torch.testing.assert_close(logps[real], rollout.logps[real], rtol=0, atol=1e-6)


def test_shared_prompt_forward_gives_the_padded_forwards_log_probs_and_gradients(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    torch.manual_seed(3)
    rollout = collect_rollout(
        model, tokenizer, batch, replace(ONLINE_SAMPLING, max_new_tokens=9, temperature=1.5), group_size=3, score=False
    )
    assert len(set(rollout.response_lengths.tolist())) > 1  # ragged responses: padding is really skipped
    assert segmented_attention(model)  # else share_prompts falls back to the padded forward and proves nothing
    # a shuffled minibatch: rows of one prompt are not contiguous
    part = rollout.select(torch.tensor([4, 0, 8, 2, 5, 1]))
    length, mask = part.response_ids.shape[1], part.response_mask.bool()
    results = {}
    for shared in (False, True):
        model.zero_grad()
        logps, entropy, hidden = token_logps(
            model,
            part.input_ids,
            part.attention_mask,
            length,
            temperature=1.5,
            with_entropy=True,
            with_hidden=True,
            share_prompts=shared,
        )
        (logps * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = (logps.detach(), entropy, hidden.detach(), grads)
    (lp, en, hid, grads), (lp_s, en_s, hid_s, grads_s) = results[False], results[True]
    torch.testing.assert_close(lp_s[mask], lp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en_s[mask], en[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hid_s[mask], hid[mask], rtol=1e-4, atol=1e-5)
    assert (lp_s[~mask] == 0).all() and grads.keys() == grads_s.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_s[name], grads[name], rtol=1e-4, atol=1e-6)
    # a critic's trunk: the same hidden states without the vocabulary head ever running
    head = model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *_: calls.append(1))
    try:
        for shared, expected in ((False, hid), (True, hid_s)):
            with torch.no_grad():
                none, no_entropy, hidden = token_logps(
                    model,
                    part.input_ids,
                    part.attention_mask,
                    length,
                    with_hidden=True,
                    with_logps=False,
                    share_prompts=shared,
                )
            assert none is None and no_entropy is None and not calls
            torch.testing.assert_close(hidden[mask], expected[mask], rtol=1e-5, atol=1e-6)
    finally:
        hook.remove()
    # a model whose logits are rescaled runs its own forward; asked for hidden states only, it still returns only them
    config = model.get_base_model().config
    config.logit_scale = 2.0  # marks the head as not plain (tiny Llama's forward ignores it)
    try:
        with torch.no_grad():
            none, no_entropy, hidden = token_logps(
                model, part.input_ids, part.attention_mask, length, with_hidden=True, with_logps=False
            )
    finally:
        del config.logit_scale
    assert none is None and no_entropy is None
    torch.testing.assert_close(hidden[mask], hid[mask], rtol=1e-5, atol=1e-6)


def test_decoding_twin_holds_the_current_merged_policy(tiny):
    from rlft.generation.decoder import decoding_twin

    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    logits = lambda network: network(input_ids=ids, attention_mask=mask).logits.float()  # noqa: E731
    with torch.no_grad():
        twin = decoding_twin(model, torch.float32)
        torch.testing.assert_close(logits(twin), logits(model), rtol=1e-5, atol=1e-5)
        lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
        saved = lora_b.clone()
        lora_b.add_(0.5)  # an optimiser step on the policy
        try:
            again = decoding_twin(model, torch.float32)
            assert again is twin  # built once, refreshed in place
            torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)
            half = decoding_twin(model, torch.bfloat16)
            assert next(half.parameters()).dtype == torch.bfloat16
            torch.testing.assert_close(logits(half), logits(model), rtol=0.05, atol=0.05)
        finally:
            lora_b.copy_(saved)
    assert not any("twin" in n for n, _ in model.named_modules())  # never part of the trained module tree
    # the twin attends in fp32 on CPU (bf16 SDPA is slow there); the policy keeps its own attention
    assert half.config._attn_implementation == "rlft_upcast_sdpa"
    assert model.get_base_model().config._attn_implementation != "rlft_upcast_sdpa"
    settings, decoder = SamplingSettings(max_new_tokens=8), DecoderSettings(decode_dtype="float32")
    twin_ids = generate_responses(model, tokenizer, ids, mask, settings, decoder)[0]
    plain_ids = generate_responses(model, tokenizer, ids, mask, SamplingSettings(max_new_tokens=8))[0]
    assert torch.equal(twin_ids, plain_ids)


def test_auto_decode_dtype_is_a_bf16_twin_of_a_fp32_policy_only_where_bf16_is_native(monkeypatch):
    from rlft.models import hardware

    fp32, bf16 = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.bfloat16)
    for native in (True, False):
        monkeypatch.setattr(hardware, "cpu_flags", lambda native=native: frozenset({"avx512_bf16"} if native else ()))
        assert hardware.decoding_dtype("auto", fp32) == (torch.bfloat16 if native else None)
        assert hardware.decoding_dtype("auto", bf16) is None  # a 16-bit policy decodes as it is
        assert hardware.decoding_dtype("float32", bf16) == torch.float32 and hardware.decoding_dtype(None, fp32) is None
        assert hardware.auto_precision("cpu") == ("bf16-mixed" if native else "32-true")
    DecoderSettings(decode_dtype="auto", backend="hf")  # auto picks no twin for other backends: nothing to refuse


def test_auto_decode_dtype_samples_from_the_twin_on_this_machine(tiny):
    """On a CPU with native bf16 (this project's), ``auto`` samples exactly what an explicit bf16 twin samples."""
    from rlft.models.hardware import fast_bf16

    if not fast_bf16("cpu"):
        pytest.skip("this CPU has no native bf16: auto picks no twin (covered above)")
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    runs = []
    for dtype in ("auto", "bfloat16"):
        torch.manual_seed(0)
        runs.append(
            generate_responses(
                model,
                tokenizer,
                ids,
                mask,
                replace(ONLINE_SAMPLING, max_new_tokens=6),
                DecoderSettings(decode_dtype=dtype),
            )[0]
        )
    assert torch.equal(*runs)


def test_decoding_settings_that_would_be_ignored_or_cannot_work_are_refused():
    with pytest.raises(ValueError, match="decode_dtype='bfloat16' needs backend 'rlft'"):
        DecoderSettings(decode_dtype="bfloat16", backend="hf")  # model.generate would sample the fp32 policy
    with pytest.raises(ValueError, match="decode_dtype must be"):
        DecoderSettings(decode_dtype="bf16")
    for free in (True, False):  # there is no twin to free or keep
        with pytest.raises(ValueError, match=f"free_twin={free} needs a decode_dtype"):
            DecoderSettings(free_twin=free)
    saved = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, modules_to_save=["lm_head"]))
    tokenizer = load_tokenizer("tiny-llama")
    batch = prompt_batch(tokenizer)
    with pytest.raises(ValueError, match="cannot be merged exactly.*decode_dtype: null"):
        generate_responses(
            saved,
            tokenizer,
            batch.input_ids,
            batch.attention_mask,
            replace(ONLINE_SAMPLING, max_new_tokens=2),
            DecoderSettings(decode_dtype="bfloat16"),
        )


@pytest.mark.parametrize("free", [True, None])
def test_the_decoding_twin_frees_its_weights_between_rollouts(tiny, free):
    """With ``free_twin`` the twin holds no weights between rollouts (i.e. through the update); the next rollout's
    refresh restores them whole, so a seeded rollout samples what it sampled before. On a CPU it keeps them by
    default."""
    from rlft.generation.decoder import _TWINS, decoding_twin

    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    settings = replace(ONLINE_SAMPLING, max_new_tokens=8)
    decoder = DecoderSettings(decode_dtype="bfloat16", free_twin=free)
    with torch.no_grad():
        before = decoding_twin(model, torch.bfloat16)(input_ids=ids, attention_mask=mask).logits
    samples = []
    for _ in range(2):
        torch.manual_seed(0)
        samples.append(generate_responses(model, tokenizer, ids, mask, settings, decoder, group_size=2)[0])
        assert all((p.untyped_storage().nbytes() == 0) == bool(free) for p in _TWINS[model].parameters())
    assert torch.equal(samples[0], samples[1])
    with torch.no_grad():
        after = decoding_twin(model, torch.bfloat16)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
