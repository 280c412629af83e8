"""Rollouts: stop masks, left padding, KV-cache generation and log-probs checked against unpadded forwards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlft.data import PromptBatch
from rlft.generation.settings import ONLINE_SAMPLING, DecoderSettings, SamplingSettings
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.scoring import position_ids_from_mask as position_ids_for
from rlft.models.tokens import stop_token_ids
from rlft.rl.rollout import (
    Rollout,
    collect_rollout,
    mask_after_stop,
    minibatches,
)

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France? Please answer in one word."}],
    [{"role": "user", "content": "Write a function that adds two numbers."}],
]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return model, tokenizer


def prompt_batch(tokenizer, prompts=PROMPTS, **fields) -> PromptBatch:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return PromptBatch(ids, mask, list(prompts), fields=fields)


def test_mask_after_stop_keeps_the_stop_token_and_pads_after_it():
    ids = torch.tensor([[5, 6, 2, 7, 8], [5, 6, 7, 8, 9], [2, 4, 2, 4, 4]])
    out, mask, finished = mask_after_stop(ids, [2], pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_for(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_stop_tokens_include_end_of_turn(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(tokenizer, model, extra=[7])
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in stops and 7 in stops


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_rollout_logps_match_unpadded_forward_and_greedy_matches_per_row_generation(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer, answer=["a", "b", "c"])
    settings = SamplingSettings(max_new_tokens=6)
    rollout = collect_rollout(model, tokenizer, batch, settings, with_reference=True)
    assert rollout.response_ids.shape == rollout.logps.shape == rollout.ref_logps.shape
    assert rollout.fields == {"answer": ["a", "b", "c"]}
    # a fresh LoRA adapter (B = 0) is the identity: policy and adapter-disabled reference agree
    torch.testing.assert_close(rollout.logps, rollout.ref_logps)
    stops = stop_token_ids(tokenizer, model)
    for row in range(len(PROMPTS)):
        prompt = batch.input_ids[row][batch.attention_mask[row].bool()]
        length = int(rollout.response_mask[row].sum())
        response = rollout.response_ids[row, :length]
        # independent reference: greedy decoding of this prompt alone (no padding at all), token by token
        with torch.no_grad():
            seq = prompt.clone()
            for _ in range(settings.max_new_tokens):
                nxt = model(input_ids=seq[None]).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt[None]])
                if int(nxt) in stops:
                    break
            assert seq[len(prompt) :].tolist() == response.tolist()
            logits = model(input_ids=seq[None]).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits.float(), -1).gather(-1, response[:, None])[:, 0]
        torch.testing.assert_close(rollout.logps[row, :length], expected, atol=1e-4, rtol=1e-4)
        text_tokens = response[:-1] if bool(rollout.finished[row]) else response
        assert rollout.completions[row] == tokenizer.decode(text_tokens, skip_special_tokens=False)


@pytest.mark.parametrize("lean", [True, False])
def test_generation_uses_the_kv_cache(tiny, lean):
    model, tokenizer = tiny
    widths = []
    embeddings = model.get_base_model().model.embed_tokens  # the lean step feeds it [B] ids, the forward [B, T]
    hook = embeddings.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1:].numel()))
    try:
        batch = prompt_batch(tokenizer)
        settings = replace(ONLINE_SAMPLING, max_new_tokens=5)
        collect_rollout(model, tokenizer, batch, settings, DecoderSettings(lean_step=lean), score=False)
    finally:
        hook.remove()
    prompt_width = batch.input_ids.shape[1]
    # the prompt is encoded once; every later step feeds only the newly sampled token
    assert widths[0] == prompt_width and all(w == 1 for w in widths[1:]) and len(widths) >= 2


class DtypesMade(TorchDispatchMode):
    """Records the dtypes of every tensor the ops running under it produce (autocast's casts included)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes |= {t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


@pytest.mark.parametrize("decode_dtype", [None, "bfloat16"])
def test_sampling_ignores_the_training_steps_autocast_and_scoring_keeps_it(tiny, decode_dtype):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    settings, decoder = replace(ONLINE_SAMPLING, max_new_tokens=12), DecoderSettings(decode_dtype=decode_dtype)
    torch.manual_seed(3)
    plain = collect_rollout(model, tokenizer, batch, settings, decoder, group_size=4)
    seen = DtypesMade()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a bf16-mixed training step
        with seen:
            sampled = collect_rollout(model, tokenizer, batch, settings, decoder, group_size=4, score=False)
        torch.manual_seed(3)
        mixed = collect_rollout(model, tokenizer, batch, settings, decoder, group_size=4)
    # sampled in the weights' own dtype (no weight cast to bf16 at every step): the same tokens as outside autocast
    assert decode_dtype is not None or torch.bfloat16 not in seen.dtypes
    assert torch.equal(sampled.response_ids, plain.response_ids)
    assert torch.equal(mixed.response_ids, plain.response_ids)
    # scored under the caller's precision, as the update's forward will score them
    assert mixed.logps.dtype == torch.float32
    assert not torch.allclose(mixed.logps, plain.logps, atol=1e-4)
    torch.testing.assert_close(mixed.logps, plain.logps, atol=0.1, rtol=0.05)


def test_group_samples_are_contiguous_and_temperature_scales_logps(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer, PROMPTS[:2], answer=["x", "y"])
    torch.manual_seed(1)
    hot = collect_rollout(
        model, tokenizer, batch, replace(ONLINE_SAMPLING, max_new_tokens=4, temperature=2.0), group_size=3
    )
    assert len(hot) == 6 and hot.fields["answer"] == ["x"] * 3 + ["y"] * 3
    assert hot.prompts[:3] == [PROMPTS[0]] * 3 and hot.prompts[3] == PROMPTS[1]
    assert torch.equal(hot.prompt_ids[0], hot.prompt_ids[2]) and torch.equal(hot.prompt_ids[3], hot.prompt_ids[5])
    # log-probs are those of the sampling distribution: logits / temperature
    row, length = 0, int(hot.response_mask[0].sum())
    with torch.no_grad():
        logits = model(
            input_ids=hot.input_ids[row : row + 1],
            attention_mask=hot.attention_mask[row : row + 1],
            position_ids=position_ids_for(hot.attention_mask[row : row + 1]),
        ).logits[0]
    width = hot.prompt_ids.shape[1]
    expected = torch.log_softmax(logits[width - 1 : width - 1 + length] / 2.0, -1)
    expected = expected.gather(-1, hot.response_ids[row, :length, None])[:, 0]
    torch.testing.assert_close(hot.logps[row, :length], expected, atol=1e-4, rtol=1e-4)


def test_select_and_minibatches():
    rollout = Rollout(
        prompt_ids=torch.arange(8).view(4, 2),
        prompt_mask=torch.ones(4, 2, dtype=torch.long),
        response_ids=torch.arange(12).view(4, 3),
        response_mask=torch.ones(4, 3, dtype=torch.long),
        completions=["a", "b", "c", "d"],
        prompts=["p0", "p1", "p2", "p3"],
        fields={"answer": [0, 1, 2, 3]},
        logps=torch.zeros(4, 3),
    )
    part = rollout.select([3, 1])
    assert part.completions == ["d", "b"] and part.fields == {"answer": [3, 1]} and part.prompts == ["p3", "p1"]
    assert part.response_ids.tolist() == [[9, 10, 11], [3, 4, 5]] and part.input_ids.shape == (2, 5)
    chunks = minibatches(10, 4, torch.Generator().manual_seed(0))
    assert [len(c) for c in chunks] == [4, 4, 2] and sorted(torch.cat(chunks).tolist()) == list(range(10))


class LargestVocabularyOutput(TorchDispatchMode):
    """The most rows of any tensor an op produces whose last dimension is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:  # views (the head's .t())
                continue
            if t.dim() and t.shape[-1] == self.vocab and t.is_floating_point():
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("share_prompts", [False, True])
def test_update_scoring_never_builds_the_whole_logits(tiny, monkeypatch, share_prompts):
    """The update's log-probs and entropy come from the LM head chunk by chunk, forward and backward: no tensor of
    more than one chunk of vocabulary rows (the old path built ``[tokens, V]`` logits and their gradient)."""
    import rlft.logprobs
    from rlft.rl.logps import token_logps

    model, tokenizer = tiny
    rollout = collect_rollout(
        model, tokenizer, prompt_batch(tokenizer), replace(ONLINE_SAMPLING, max_new_tokens=8), group_size=2, score=False
    )
    length = rollout.response_ids.shape[1]
    assert int(rollout.response_mask.sum()) > 24
    expected = token_logps(
        model, rollout.input_ids, rollout.attention_mask, length, with_entropy=True, share_prompts=share_prompts
    )
    monkeypatch.setattr(rlft.logprobs, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(rlft.logprobs, "CHUNK_BYTES", 4 * 4 * model.config.vocab_size)  # 4 rows of fp32 logits
    seen = LargestVocabularyOutput(model.config.vocab_size)
    with seen:
        logps, entropy, _ = token_logps(
            model, rollout.input_ids, rollout.attention_mask, length, with_entropy=True, share_prompts=share_prompts
        )
        (logps * rollout.response_mask).sum().backward()
    assert 0 < seen.rows <= 4
    torch.testing.assert_close(logps, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected[1], atol=1e-5, rtol=0)
    model.zero_grad()
