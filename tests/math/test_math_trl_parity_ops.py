"""Parity of rlft.ops with TRL (1.16, a test-only oracle): log-prob and entropy kernels, per-sequence log-probs of
a tiny Llama through TRL's own log-prob paths, and the advantage / whitening / GAE / PPO formulas.

TRL 1.16 no longer ships ``PPOTrainer``, ``masked_whiten``/``masked_var``/``masked_mean`` or GAE, and inlines the
GRPO/RLOO advantage formulas in a long rollout method; for those the reference is TRL's formula transcribed into a
short readable function here (hand-computed checks are in ``test_math_ops.py``).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, entropy_from_logits, nanstd, selective_log_softmax  # noqa: E402

from rlft import logprobs, ops  # noqa: E402
from rlft import losses as L  # noqa: E402

ATOL = 1e-6


def test_group_advantages_match_trl_formulas():
    """TRL 1.16 inlines these in ``GRPOTrainer/RLOOTrainer._generate_and_score_completions``; transcribed here with
    TRL's own ``nanstd``: GRPO ``(r - group_mean) / (nanstd(group) + 1e-4)``, RLOO ``r - (sum - r) / (k - 1)``."""
    gen = torch.Generator().manual_seed(6)
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    grpo = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(ops.group_advantages(rewards, 4), grpo.view(-1), atol=ATOL, rtol=0)
    batch = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(rewards) + 1e-4)
    torch.testing.assert_close(ops.group_advantages(rewards, 4, scale="batch"), batch.view(-1), atol=ATOL, rtol=0)
    rloo = grouped - (grouped.sum(1, keepdim=True) - grouped) / 3
    torch.testing.assert_close(
        ops.group_advantages(rewards, 4, baseline="leave_one_out", scale="none"), rloo.view(-1), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_logps_and_entropy_match_trl(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (5 * torch.randn(3, 13, 257, generator=gen)).to(dtype)
    labels = torch.randint(0, 257, (3, 13), generator=gen)
    atol = ATOL if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(
        logprobs.gather_logps(logits, labels, chunk_size=8), selective_log_softmax(logits, labels), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        logprobs.entropy_from_logits(logits, chunk_size=8), entropy_from_logits(logits), atol=atol, rtol=0
    )


def _trl_v011_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_v011_masked_whiten(values, mask, shift_mean=True):
    mean = _trl_v011_masked_mean(values, mask)
    variance = _trl_v011_masked_mean((values - mean) ** 2, mask)
    variance = variance * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def _trl_v011_gae(rewards, values, padding_mask, gamma, lam):
    values = values.masked_fill(padding_mask, 0.0)
    rewards = rewards.masked_fill(padding_mask, 0.0)
    last, reversed_advantages = 0.0, []
    for step in reversed(range(rewards.shape[1])):
        next_values = values[:, step + 1] if step < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, step] + gamma * next_values - values[:, step]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages.masked_fill(padding_mask, 0.0), (advantages + values).masked_fill(padding_mask, 0.0)


def test_whiten_gae_and_ppo_losses_match_trl_v011_reference():
    """TRL 1.16 ships no ``PPOTrainer``, ``masked_whiten`` or GAE; the reference here is TRL 0.11's formulas
    (``trl/core.py`` and ``PPOTrainer.train``) written out as a readable loop."""
    gen = torch.Generator().manual_seed(8)
    batch, length = 5, 8
    padding = torch.arange(length) >= torch.randint(2, length + 1, (batch,), generator=gen)[:, None]
    mask = (~padding).long()
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    advantages, returns = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_advantages, ref_returns = _trl_v011_gae(rewards, values, padding, 0.99, 0.95)
    torch.testing.assert_close(advantages, ref_advantages, atol=ATOL, rtol=0)
    torch.testing.assert_close(returns, ref_returns, atol=ATOL, rtol=0)
    for shift in (True, False):
        torch.testing.assert_close(
            ops.masked_whiten(advantages, mask, shift_mean=shift),
            _trl_v011_masked_whiten(advantages, mask, shift),
            atol=ATOL,
            rtol=0,
        )

    whitened = ops.masked_whiten(advantages, mask).masked_fill(padding, 0.0)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64)
    new = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ratio = torch.exp(new - old)
    pg = torch.max(-whitened * ratio, -whitened * torch.clamp(ratio, 0.8, 1.2))
    ours, stats = L.ppo_policy_loss(new, old, whitened, mask, clip_range=0.2)
    assert ours.mean().item() == pytest.approx(_trl_v011_masked_mean(pg, mask).item(), abs=ATOL)
    new_values = values + 0.5 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    clipped = torch.clamp(new_values, values - 0.2, values + 0.2)
    vf = 0.5 * _trl_v011_masked_mean(torch.max((new_values - returns) ** 2, (clipped - returns) ** 2), mask)
    ours_vf, _ = L.ppo_value_loss(new_values, values, returns, mask, clip_range_value=0.2)
    assert ours_vf.mean().item() == pytest.approx(vf.item(), abs=ATOL)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_sequence_logps_of_tiny_llama_match_trl(tiny_llama):
    """Same model, same padded prompt+completion batch: rlft's logits path, rlft's hidden-state path, TRL's
    ``selective_log_softmax`` path and TRL's fused LM head (the one ``DPOTrainer`` uses) agree to 1e-5."""
    gen = torch.Generator().manual_seed(9)
    prompt_lens, completion_lens, length = [3, 5, 2, 4], [6, 2, 9, 4], 12
    input_ids = torch.full((4, length), 0, dtype=torch.long)
    attention_mask = torch.zeros(4, length, dtype=torch.long)
    completion_mask = torch.zeros(4, length, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        input_ids[row, : p + c] = torch.randint(1, 300, (p + c,), generator=gen)
        attention_mask[row, : p + c] = 1
        completion_mask[row, p : p + c] = 1
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, logprobs.IGNORE_INDEX)

    outputs = tiny_llama(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logits = outputs.logits
    ours = ops.sequence_logps(logprobs.gather_logps(logits[:, :-1], labels, chunk_size=5), completion_mask[:, 1:])
    hidden = outputs.hidden_states[-1][:, :-1]
    from_hidden = ops.sequence_logps(
        logprobs.hidden_logps(hidden, tiny_llama.lm_head.weight, labels, chunk_size=7), completion_mask[:, 1:]
    )
    trl_selective = (selective_log_softmax(logits[:, :-1], input_ids[:, 1:]) * completion_mask[:, 1:]).sum(1)

    fused = copy.deepcopy(tiny_llama)
    add_fused_lm_head(fused)
    trl_labels = input_ids.masked_fill(completion_mask == 0, logprobs.IGNORE_INDEX)
    fused_out = fused(input_ids=input_ids, attention_mask=attention_mask, labels=trl_labels, fused_lm_head=True)
    trl_fused = fused_out.log_probs[:, -(length - 1) :].sum(1)

    assert ours.abs().min() > 1.0  # real, non-trivial log-probs
    for other in (from_hidden, trl_selective, trl_fused):
        torch.testing.assert_close(ours, other, atol=1e-5, rtol=0)

    # Gradients through the model agree too (rlft chunked kernels vs TRL's plain log-softmax path).
    params = [p for p in tiny_llama.parameters()]
    grads_ours = torch.autograd.grad(ours.sum(), params, retain_graph=True)
    grads_trl = torch.autograd.grad(trl_selective.sum(), params)
    for g_ours, g_trl in zip(grads_ours, grads_trl):
        torch.testing.assert_close(g_ours, g_trl, atol=1e-5, rtol=1e-4)
