"""Parity with TRL (1.16, a test-only oracle): identical random inputs, TRL's own code on one side, rlft on the other.

TRL's losses live inside trainer methods. We call those methods unbound on a minimal stand-in ``self`` that carries
only the attributes the method reads (see ``trl/trainer/dpo_trainer.py::_compute_loss`` etc.), with a stand-in model
returning fixed per-token log-probs, so the number that comes back is TRL's arithmetic on our inputs.

Where TRL 1.16 has no implementation (PPO, ``masked_whiten``/``masked_var``/``masked_mean``, GAE were removed with
``PPOTrainer``; the GRPO/RLOO advantage formulas are inlined in a long rollout method), the test says so and
compares against a short reference transcribed from TRL's formula; hand-computed checks are in the other files.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOTrainer, GRPOTrainer, RewardTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, entropy_from_logits, nanstd, selective_log_softmax  # noqa: E402

from rlft import losses as L  # noqa: E402
from rlft import ops  # noqa: E402

ATOL = 1e-6


class _Accelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: collectives are identities."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trainer_stub(**attributes) -> SimpleNamespace:
    base = dict(
        model=SimpleNamespace(training=False),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
    )
    return SimpleNamespace(**(base | attributes))


def _random_pair_batch(batch: int, length: int, seed: int):
    """Completion mask (prompt, completion, padding) and per-token log-probs for [chosen; rejected] rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * batch
    prompt_len = torch.randint(1, 3, (rows,), generator=gen)
    completion_len = torch.randint(1, length - 2, (rows,), generator=gen)
    positions = torch.arange(length)
    completion_mask = ((positions >= prompt_len[:, None]) & (positions < (prompt_len + completion_len)[:, None])).long()
    token_logps = -3 * torch.rand(rows, length - 1, generator=gen, dtype=torch.float64)
    token_logps = token_logps * completion_mask[:, 1:]  # TRL's fused head returns 0 where the label is -100
    ref = -10 * torch.rand(rows, generator=gen, dtype=torch.float64)
    return completion_mask, token_logps, ref


def _trl_dpo(completion_mask, token_logps, ref, *, loss_type, beta, label_smoothing=0.0):
    """Run ``DPOTrainer._compute_loss`` with precomputed reference log-probs and a stand-in model."""
    rows = completion_mask.shape[0]
    outputs = SimpleNamespace(
        log_probs=token_logps,
        entropy=torch.zeros_like(token_logps),
        mean_logits=torch.zeros_like(token_logps),
        is_top1=torch.zeros_like(token_logps, dtype=torch.bool),
    )
    stub = _trainer_stub(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)
    assert rows == 2 * ref_chosen.shape[0]
    return loss, stub._metrics["eval"]


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("robust", 0.3)]
)
def test_dpo_matches_trl_dpo_trainer(loss_type, label_smoothing):
    batch, beta = 5, 0.3
    completion_mask, token_logps, ref = _random_pair_batch(batch, 9, seed=0)
    policy = token_logps.sum(1)
    if loss_type == "ipo":  # TRL divides IPO's log-ratios by the completion length; we take averaged inputs
        lengths = completion_mask.sum(1).to(policy.dtype)
        policy, ref = policy / lengths, ref / lengths
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    ours, chosen_rewards, rejected_rewards = L.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    trl_loss, metrics = _trl_dpo(
        completion_mask,
        token_logps,
        torch.cat([rc, rr]) * (lengths if loss_type == "ipo" else 1),
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    assert ours.mean().item() == pytest.approx(trl_loss.item(), abs=ATOL)
    if loss_type != "ipo":  # for IPO our inputs (and so our rewards) are length-averaged, TRL's rewards are not
        assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=ATOL)
        assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=ATOL)
    # per example: TRL reduces with a mean, so run it one pair at a time
    chosen_rows, rejected_rows = torch.arange(batch), torch.arange(batch, 2 * batch)
    for i in range(batch):
        rows = torch.stack([chosen_rows[i], rejected_rows[i]])
        ref_rows = torch.cat([rc[i : i + 1], rr[i : i + 1]])
        if loss_type == "ipo":
            ref_rows = ref_rows * lengths[rows]
        single, _ = _trl_dpo(
            completion_mask[rows],
            token_logps[rows],
            ref_rows,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
        )
        assert ours[i].item() == pytest.approx(single.item(), abs=ATOL)


def _cpo_stub(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.5):
    return _trainer_stub(
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, alpha=0.0, simpo_gamma=simpo_gamma
    )


@pytest.mark.parametrize("label_smoothing", [0.1, 0.25])
def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(label_smoothing):
    """TRL 1.16's ``DPOTrainer`` dropped label smoothing from ``sigmoid``; its ``CPOTrainer.cpo_loss`` keeps the
    cDPO formula on ``logits = chosen - rejected``. Feeding it the policy/reference log-ratios gives cDPO."""
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(4))
    ours, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.1, label_smoothing), pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma, label_smoothing):
    gen = torch.Generator().manual_seed(2)
    pc, pr = (-3 * torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(2))
    ours, chosen_rewards, rejected_rewards = L.simpo_loss(
        pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing
    )
    stub = _cpo_stub("simpo", beta, label_smoothing, simpo_gamma=gamma)
    theirs, their_chosen, their_rejected = CPOTrainer.cpo_loss(stub, pc, pr)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen_rewards, their_chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected_rewards, their_rejected, atol=ATOL, rtol=0)


def test_orpo_matches_trl_odds_ratio_loss():
    gen = torch.Generator().manual_seed(3)
    pc = -3 * torch.rand(10, generator=gen, dtype=torch.float64)
    pr = -3 * torch.rand(10, generator=gen, dtype=torch.float64)
    pc[0], pr[1] = -1e-4, -0.6931  # both sides of log1mexp's branch point
    nll = torch.rand(10, generator=gen, dtype=torch.float64)
    beta = 0.25
    ours, stats = L.orpo_loss(pc, pr, nll, beta=beta)
    stub = _trainer_stub(beta=beta)
    their_losses, their_chosen, their_rejected, their_ratio, their_log_odds = ORPOTrainer.odds_ratio_loss(stub, pc, pr)
    # TRL returns beta * log sigma(log OR) and the full loss is nll - mean(that)
    torch.testing.assert_close(ours - nll, -their_losses.double(), atol=ATOL, rtol=0)
    assert ours.mean().item() == pytest.approx((nll.mean() - their_losses.mean()).item(), abs=ATOL)
    torch.testing.assert_close(stats["chosen_rewards"], their_chosen.double(), atol=ATOL, rtol=0)
    torch.testing.assert_close(stats["rejected_rewards"], their_rejected.double(), atol=ATOL, rtol=0)
    assert stats["log_odds_ratio"].mean().item() == pytest.approx(their_ratio.item(), abs=ATOL)
    assert stats["log_odds_chosen"].mean().item() == pytest.approx(their_log_odds.item(), abs=ATOL)


@pytest.mark.parametrize(("use_margin", "center"), [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center):
    gen = torch.Generator().manual_seed(4)
    chosen, rejected = (3 * torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(2))
    margin = torch.rand(7, generator=gen, dtype=torch.float64) if use_margin else None
    ours = L.bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center or 0.0)
    stub = _trainer_stub(args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(14, 3, dtype=torch.long), "attention_mask": torch.ones(14, 3)}
    if use_margin:
        inputs["margin"] = margin
    scores = torch.cat([chosen, rejected]).unsqueeze(-1)
    theirs = RewardTrainer.compute_loss(stub, lambda **kwargs: SimpleNamespace(logits=scores), inputs)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=ATOL)


@pytest.mark.parametrize(
    ("loss_type", "aggregation", "beta", "eps_high"),
    [("grpo", "sequence", 0.04, 0.2), ("bnpo", "token", 0.1, 0.28), ("dr_grpo", "dr_grpo", 0.0, 0.2)],
)
def test_grpo_matches_trl_grpo_trainer(loss_type, aggregation, beta, eps_high):
    gen = torch.Generator().manual_seed(5)
    batch, length, max_completion_length = 6, 7, 9
    mask = (torch.arange(length) < torch.randint(1, length + 1, (batch,), generator=gen)[:, None]).long()
    old = -2 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    logprobs = old + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)  # ratios beyond the clip
    ref = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    ours, stats = L.grpo_loss(
        logprobs,
        old,
        ref,
        advantages,
        mask,
        clip_range=0.2,
        clip_range_high=eps_high,
        beta=beta,
        loss_aggregation=aggregation,
        max_length=max_completion_length,
    )
    stub = _trainer_stub(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
    )
    inputs = {
        "prompt_ids": torch.ones(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    theirs = GRPOTrainer._compute_loss(stub, None, inputs)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=ATOL)
    metrics = stub._metrics["eval"]
    if beta:
        token_kl = (stats["kl"] * mask.sum(1)).sum() / mask.sum()
        assert token_kl.item() == pytest.approx(metrics["kl"][0], abs=ATOL)
    token_clip = (stats["clipfrac"] * mask.sum(1)).sum() / mask.sum()
    assert token_clip.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=ATOL)
    assert token_clip > 0  # the inputs do exercise clipping


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
        ops.gather_logps(logits, labels, chunk_size=8), selective_log_softmax(logits, labels), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        ops.entropy_from_logits(logits, chunk_size=8), entropy_from_logits(logits), atol=atol, rtol=0
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
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, ops.IGNORE_INDEX)

    outputs = tiny_llama(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logits = outputs.logits
    ours = ops.sequence_logps(ops.gather_logps(logits[:, :-1], labels, chunk_size=5), completion_mask[:, 1:])
    hidden = outputs.hidden_states[-1][:, :-1]
    from_hidden = ops.sequence_logps(
        ops.hidden_logps(hidden, tiny_llama.lm_head.weight, labels, chunk_size=7), completion_mask[:, 1:]
    )
    trl_selective = (selective_log_softmax(logits[:, :-1], input_ids[:, 1:]) * completion_mask[:, 1:]).sum(1)

    fused = copy.deepcopy(tiny_llama)
    add_fused_lm_head(fused)
    trl_labels = input_ids.masked_fill(completion_mask == 0, ops.IGNORE_INDEX)
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
