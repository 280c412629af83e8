"""Loss parity with TRL (1.16, a test-only oracle): identical random inputs, TRL's own code on one side, rlft on the
other.

TRL's losses live inside trainer methods. We call those methods unbound on a minimal stand-in ``self`` that carries
only the attributes the method reads (see ``trl/trainer/dpo_trainer.py::_compute_loss`` etc.), with a stand-in model
returning fixed per-token log-probs, so the number that comes back is TRL's arithmetic on our inputs.

TRL 1.16 has no PPO losses (``PPOTrainer`` was removed); those, the advantage formulas and the log-prob paths are
compared in ``test_math_trl_parity_ops.py``; hand-computed checks are in ``test_math_losses.py``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl")

from trl import DPOTrainer, GRPOTrainer, RewardTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from rlft import losses as L  # noqa: E402

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
    ours, stats = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    chosen_rewards, rejected_rewards = stats["chosen_rewards"], stats["rejected_rewards"]
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
    ours = L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing).losses
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.1, label_smoothing), pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma, label_smoothing):
    gen = torch.Generator().manual_seed(2)
    pc, pr = (-3 * torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(2))
    ours, stats = L.simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    chosen_rewards, rejected_rewards = stats["chosen_rewards"], stats["rejected_rewards"]
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
    ours = L.bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center or 0.0).losses
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
        max_new_tokens=max_completion_length,
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
