"""The lean decoding step against the model's own forward, token by token, on every architecture it claims."""

from __future__ import annotations

import pytest
import torch

from rlft.generation.decoder import decode, decoding_twin, merged_adapter
from rlft.generation.kv_cache import cache_argument, preallocated_cache
from rlft.generation.lean_step import _Projection, join_projections, lean_step
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.scoring import position_ids_from_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: positions count real tokens only
    mask[2, :1] = 0
    return ids, mask


def _step_logits(model, ids, mask, tokens, lean: bool, cache_dtype=None) -> torch.Tensor:
    """Prefill through the model, then one logits row per fed token, by the lean step or by the forward."""
    cache = preallocated_cache(model.config, ids.shape[1] + tokens.shape[1], cache_dtype)
    arg = cache_argument(model, cache)
    out = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True, **arg)
        step = lean_step(model, cache) if lean else None
        positions = mask.sum(-1, keepdim=True)
        for column in tokens.T:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if lean:
                out.append(step(column, mask, positions))
            else:
                out.append(
                    model(
                        input_ids=column[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **arg
                    ).logits[:, -1]
                )
            positions = positions + 1
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_lean_step_computes_the_models_own_logits(name):
    torch.manual_seed(0)
    model = load_model(name).eval()
    ids, mask = _prompts(model.config.vocab_size)
    tokens = torch.randint(3, model.config.vocab_size, (3, 6))
    reference = _step_logits(model, ids, mask, tokens, lean=False)
    lean = _step_logits(model, ids, mask, tokens, lean=True)
    torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)
    # with q/k/v and gate/up laid back to back the step multiplies by views of the same weights
    attention = model.model.layers[0].self_attn
    assert _Projection([attention.q_proj, attention.k_proj, attention.v_proj]).weight is None  # apart: 3 matmuls
    join_projections(model)
    joined = _Projection([attention.q_proj, attention.k_proj, attention.v_proj]).weight
    assert joined.data_ptr() == attention.q_proj.weight.data_ptr()  # a view: one matmul, no copy
    torch.testing.assert_close(_step_logits(model, ids, mask, tokens, lean=False), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_step_logits(model, ids, mask, tokens, lean=True), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gpt2", "tiny-opt", "tiny-mistral"])
def test_other_architectures_step_through_their_forward(name):
    # (tiny-mistral has a 4096-token sliding window, whose cache layers are not preallocated)
    model = load_model(name).eval()
    assert lean_step(model, preallocated_cache(model.config, 8)) is None


def test_an_unmerged_adapter_is_never_skipped():
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    cache = preallocated_cache(model.config, 8)
    assert lean_step(model, cache) is None  # it would decode the base model alone
    with merged_adapter(model):
        assert lean_step(model, cache) is not None
    assert lean_step(model.train(), cache) is None


def test_decode_samples_the_same_tokens_either_way():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids, mask = _prompts(model.config.vocab_size)
    common = dict(max_new_tokens=12, stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id, group_size=3)
    with merged_adapter(model):
        greedy = [decode(model, ids, mask, temperature=0.0, lean=lean, **common) for lean in (True, False)]
        sampled = []
        for lean in (True, False):
            torch.manual_seed(5)
            sampled.append(decode(model, ids, mask, temperature=1.0, lean=lean, **common))
    assert torch.equal(greedy[0], greedy[1])
    assert torch.equal(sampled[0], sampled[1])
    # the bf16 twin's projections are joined (no copy per rollout) and it decodes close to the fp32 policy
    twin = decoding_twin(model, torch.bfloat16)
    attention = twin.model.layers[1].self_attn
    q_weight = attention.q_proj.weight
    assert attention.k_proj.weight.data_ptr() == q_weight.data_ptr() + q_weight.numel() * q_weight.element_size()
    # as decode runs it: bf16 weights, fp32 cache and attention; the lean step's joined bf16 matmuls round
    # differently from three separate ones, so compare at bf16 precision
    tokens = torch.randint(3, model.config.vocab_size, (3, 6))
    lean = _step_logits(twin, ids, mask, tokens, lean=True, cache_dtype=torch.float32)
    forward = _step_logits(twin, ids, mask, tokens, lean=False, cache_dtype=torch.float32)
    assert lean.dtype == torch.bfloat16
    torch.testing.assert_close(lean.float(), forward.float(), rtol=0.05, atol=0.05)
    with torch.no_grad():
        policy = _step_logits(model, ids, mask, tokens, lean=False)
    torch.testing.assert_close(lean.float(), policy, rtol=0.05, atol=0.05)


def test_decoding_through_the_forward_is_said_once_per_architecture(caplog, monkeypatch):
    from rlft.generation import decoder as decoding

    monkeypatch.setattr(decoding, "_FORWARD_NOTED", set())  # other tests in this process may have decoded Gemma
    tokenizer = load_tokenizer("tiny-gemma")
    model = load_model("tiny-gemma").eval()
    ids, mask = _prompts(model.config.vocab_size)
    common = dict(max_new_tokens=3, stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    with caplog.at_level("INFO", logger="rlft.generation.decoder"):
        for _ in range(2):
            decode(model, ids, mask, temperature=0.0, **common)
    notes = [r.getMessage() for r in caplog.records if "no lean step" in r.getMessage()]
    assert len(notes) == 1 and "gemma" in notes[0]
