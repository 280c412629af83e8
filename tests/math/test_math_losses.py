"""rlft.losses against numbers worked out by hand (written with ``math.log`` / ``math.exp``), plus gradients,
registries and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.losses import (
    DPO_LOSS_TYPES,
    LOSS_AGGREGATIONS,
    LOSSES,
    bradley_terry_loss,
    dpo_loss,
    grpo_loss,
    log1mexp,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rpo_nll_term,
    sft_loss,
    simpo_loss,
)
from rlft.outputs import LossOutput


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_registries_name_every_loss():
    assert set(LOSSES) == {
        "sft",
        "bradley_terry",
        "kwise_bradley_terry",
        "plackett_luce",
        "dpo",
        "orpo",
        "simpo",
        "ppo_policy",
        "ppo_value",
        "grpo",
        "kto",
    }
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "robust"}
    assert set(LOSS_AGGREGATIONS) == {"sequence", "token", "dr_grpo"}
    for fn in LOSSES.values():
        assert "arxiv.org" in fn.__doc__ or "http" in fn.__doc__


def test_sft_loss_is_per_example_mean_nll():
    token_logps = torch.tensor([[math.log(0.5), math.log(0.25), -7.0], [math.log(0.1), -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = [(math.log(2) + math.log(4)) / 2, math.log(10)]
    assert sft_loss(token_logps, mask).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sft_loss(token_logps[0], mask[0])


def test_bradley_terry_hand_computed():
    chosen, rejected = t(2.0, 0.0), t(1.0, 0.5)
    plain = bradley_terry_loss(chosen, rejected)
    assert isinstance(plain, LossOutput) and plain.losses.tolist() == pytest.approx([softplus(-1.0), softplus(0.5)])
    assert plain.stats["chosen_rewards"].tolist() == [2.0, 0.0]
    assert plain.stats["rejected_rewards"].tolist() == [1.0, 0.5]
    with_margin = bradley_terry_loss(chosen, rejected, margin=t(0.5, 1.0)).losses
    assert with_margin.tolist() == pytest.approx([softplus(-0.5), softplus(1.5)])
    centred = bradley_terry_loss(chosen, rejected, center_coef=0.01).losses
    assert centred.tolist() == pytest.approx([softplus(-1.0) + 0.01 * 9, softplus(0.5) + 0.01 * 0.25])
    with pytest.raises(ValueError, match="batch"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


# policy chosen/rejected and reference chosen/rejected: h = (-1 - -2) - (-3 - -2) = 2
DPO_INPUTS = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, softplus(-0.2)),
        ("sigmoid", 0.1, 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)),  # cDPO
        ("hinge", 0.0, 1 - 0.2),
        ("ipo", 0.0, (2 - 1 / (2 * 0.1)) ** 2),
        ("robust", 0.1, (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8),
    ],
)
def test_dpo_variants_hand_computed(loss_type, label_smoothing, expected):
    output = dpo_loss(*DPO_INPUTS, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    assert isinstance(output, LossOutput)
    losses, stats = output
    chosen_rewards, rejected_rewards = stats["chosen_rewards"], stats["rejected_rewards"]
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.item() == pytest.approx(0.1 * 1.0) and rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_gradient_and_detached_rewards():
    policy_chosen = t(-1.0).requires_grad_(True)
    losses, stats = dpo_loss(policy_chosen, t(-3.0), t(-2.0), t(-2.0), beta=0.1)
    chosen_rewards = stats["chosen_rewards"]
    losses.sum().backward()
    # d/dpc -log sigma(beta h) = -beta * sigma(-beta h)
    assert policy_chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))
    assert not chosen_rewards.requires_grad


def test_rpo_adds_weighted_chosen_nll():
    losses, _ = dpo_loss(*DPO_INPUTS, beta=0.1, chosen_nll=t(1.5), rpo_alpha=0.5)
    assert losses.item() == pytest.approx(softplus(-0.2) + 0.75)
    assert rpo_nll_term(t(2.0, 4.0), 0.25).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="both chosen_nll and rpo_alpha"):
        dpo_loss(*DPO_INPUTS, chosen_nll=t(1.0))


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(*DPO_INPUTS, loss_type="hindge")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(*DPO_INPUTS, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*DPO_INPUTS, beta=0.0)
    with pytest.raises(ValueError, match="shaped"):
        dpo_loss(t(-1.0, -2.0), *DPO_INPUTS[1:])


def test_log1mexp_stable_on_both_branches():
    for x in (-1e-8, -1e-3, -0.5, -math.log(2), -3.0, -50.0):
        expected = math.log(-math.expm1(x))
        assert log1mexp(t(x)).item() == pytest.approx(expected, rel=1e-12)


def test_orpo_hand_computed():
    # p_c = 0.5 -> odds 1 (log 0); p_r = 0.2 -> odds 1/4; log OR = log 4
    losses, stats = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), t(0.7), beta=0.1)
    log_sigma = -math.log(1 + 1 / 4)  # log sigma(log 4) = log(4/5)
    assert losses.item() == pytest.approx(0.7 - 0.1 * log_sigma, rel=1e-12)
    assert stats["log_odds_chosen"].item() == pytest.approx(math.log(4))
    assert stats["log_odds_ratio"].item() == pytest.approx(log_sigma)
    assert stats["nll"].item() == 0.7
    assert stats["chosen_rewards"].item() == pytest.approx(0.1 * math.log(0.5))


def test_orpo_is_finite_at_probability_one_and_rejects_positive_logps():
    chosen = t(0.0).requires_grad_(True)
    losses, _ = orpo_loss(chosen, t(-1.0), t(0.0))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    with pytest.raises(ValueError, match="<= 0"):
        orpo_loss(t(3.0), t(-1.0), t(0.0))


def test_simpo_hand_computed():
    # beta * (avg_c - avg_r) - gamma = 2 * 0.5 - 0.5 = 0.5
    losses, stats = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5))
    assert (stats["chosen_rewards"].item(), stats["rejected_rewards"].item()) == (-2.0, -3.0)
    smoothed, _ = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * softplus(-0.5) + 0.2 * softplus(0.5))


def _log_ratio_inputs(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=torch.float64)
    return old + torch.tensor(ratios, dtype=torch.float64).log(), old


def test_ppo_policy_loss_hand_computed():
    logprobs, old = _log_ratio_inputs([[1.5, 0.5, 0.5], [1.1, 1.0, 1.0]])
    advantages = t(1.0, 1.0, -1.0, 2.0, 0.0, 0.0).view(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # tokens: max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(0.5, 0.8) = 0.8 (clipped);
    # row 1: max(-2.2, -2.2) = -2.2
    seq, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, loss_aggregation="sequence")
    assert seq.tolist() == pytest.approx([(-1.2 - 0.5 + 0.8) / 3, -2.2])
    token, _ = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert token.mean().item() == pytest.approx((-1.2 - 0.5 + 0.8 - 2.2) / 4)
    assert stats["clipfrac"].tolist() == pytest.approx([2 / 3, 0.0])
    half_sq = [0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 0.5)]
    assert stats["approx_kl"].tolist() == pytest.approx([sum(half_sq) / 3, 0.5 * math.log(1.1) ** 2])


def test_ppo_value_loss_hand_computed():
    values, old_values, returns = t(1.0, 2.0).view(1, 2), t(0.5, 2.0).view(1, 2), t(2.0, 1.0).view(1, 2)
    losses, stats = ppo_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; token 1: 1.0
    assert losses.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)


def test_grpo_loss_hand_computed_with_k3_and_aggregations():
    logprobs, old = _log_ratio_inputs([[1.5, 1.0], [0.5, 0.9]])
    ref = old + math.log(2.0)  # ref / pi = 2 / ratio
    advantages = t(1.0, -1.0)
    mask = torch.tensor([[1, 1], [1, 0]])
    beta = 0.1

    def k3(ratio: float) -> float:
        r = 2.0 / ratio
        return r - 1 - math.log(r)

    # row 0 (A=+1): -min(1.5, 1.2) = -1.2 ; -min(1, 1) = -1 ; row 1 (A=-1): -min(-0.5, -0.8) = 0.8
    tok = [[-1.2 + beta * k3(1.5), -1.0 + beta * k3(1.0)], [0.8 + beta * k3(0.5), None]]
    seq, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip_range=0.2, beta=beta)
    assert seq.tolist() == pytest.approx([(tok[0][0] + tok[0][1]) / 2, tok[1][0]])
    token, _ = grpo_loss(logprobs, old, ref, advantages, mask, beta=beta, loss_aggregation="token")
    assert token.mean().item() == pytest.approx((tok[0][0] + tok[0][1] + tok[1][0]) / 3)
    dr, _ = grpo_loss(logprobs, old, ref, advantages, mask, beta=beta, loss_aggregation="dr_grpo", max_new_tokens=4)
    assert dr.tolist() == pytest.approx([(tok[0][0] + tok[0][1]) / 4, tok[1][0] / 4])
    assert stats["kl"].tolist() == pytest.approx([(k3(1.5) + k3(1.0)) / 2, k3(0.5)])
    assert stats["clipfrac_high"].tolist() == [0.5, 0.0] and stats["clipfrac_low"].tolist() == [0.0, 1.0]


def test_grpo_clip_higher_and_no_reference():
    logprobs, old = _log_ratio_inputs([[1.5]])
    losses, stats = grpo_loss(logprobs, old, None, t(1.0), torch.ones(1, 1), clip_range_high=0.28, beta=0.0)
    assert losses.item() == pytest.approx(-1.28)
    assert "kl" not in stats
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        grpo_loss(logprobs, old, None, t(1.0), torch.ones(1, 1), beta=0.04)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        grpo_loss(logprobs, old, None, t(1.0), torch.ones(1, 1), beta=0.0, loss_aggregation="mean")


def test_grpo_gradient_flows_only_through_unclipped_tokens():
    logprobs, old = _log_ratio_inputs([[1.5, 1.0]])
    logprobs.requires_grad_(True)
    losses, _ = grpo_loss(logprobs, old, None, t(1.0), torch.ones(1, 2), beta=0.0)
    losses.sum().backward()
    # clipped token: no gradient; unclipped ratio 1: d(-rho/2)/dlogp = -rho/2 = -0.5
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.5])
