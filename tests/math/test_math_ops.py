"""rlft.ops: masked statistics, sequence log-probs, KL estimators, GAE and group advantages against numbers
worked out by hand (arithmetic written with ``math``, not with the function under test)."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.ops import (
    ADVANTAGE_BASELINES,
    ADVANTAGE_SCALES,
    KL_ESTIMATORS,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    sequence_logps,
)


def test_sequence_logps_sum_and_average():
    token_logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -9.0, -9.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert sequence_logps(token_logps, mask).tolist() == [-7.0, -0.5, 0.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == pytest.approx([-7 / 3, -0.5, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        sequence_logps(token_logps, mask[:, :2])


def test_masked_mean_var_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, squared deviations 1 + 0 + 1 = 2, biased var 2/3, Bessel n/(n-1) = 3/2 -> 1
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    whitened = masked_whiten(x, mask)
    scale = 1 / math.sqrt(1.0 + 1e-8)
    assert whitened[0, :3].tolist() == pytest.approx([-scale, 0.0, scale], abs=1e-6)
    assert whitened[0, 3].item() == pytest.approx(98 * scale, rel=1e-6)  # padding is transformed too, like TRL
    assert masked_whiten(x, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_masked_mean_along_dim_and_empty_rows():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert masked_mean(x, mask, dim=-1).tolist() == [2.0, 0.0]
    assert masked_mean(x, mask, dim=0).tolist() == [1.0, 3.0]
    x.requires_grad_(True)
    masked_mean(x, mask, dim=-1).sum().backward()
    assert not torch.isnan(x.grad).any()


def test_masked_var_errors_are_actionable():
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="selects no element"):
        masked_var(x, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([1, 0]))


def test_kl_estimators_hand_computed():
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    # r = ref / pi = 0.5
    assert kl_estimate(logp, ref_logp, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref_logp, "k2").item() == pytest.approx(0.5 * math.log(0.5) ** 2)
    assert kl_estimate(logp, ref_logp, "k3").item() == pytest.approx(0.5 - 1 - math.log(0.5))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref_logp, "k4")


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    """E_{x~pi}[k] over a full categorical equals KL(pi||ref) exactly for k1 and k3 (not for k2)."""
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    kl = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist()))
    for kind in ("k1", "k3"):
        expectation = (pi * kl_estimate(pi.log(), ref.log(), kind)).sum().item()
        assert expectation == pytest.approx(kl, abs=1e-12)
    assert (kl_estimate(pi.log(), ref.log(), "k3") >= 0).all()


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [1.0, 1.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.7 - 0.6 = 0.1; delta_0 = 0.6 - 0.5 = 0.1
    a2 = 0.3
    a1 = 0.1 + 0.95 * a2
    a0 = 0.1 + 0.95 * a1
    # row 1 (two tokens): delta_1 = 2 - 1.5 = 0.5; delta_0 = 1.5 - 1.0 = 0.5
    b1 = 0.5
    b0 = 0.5 + 0.95 * b1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0], [b0, b1, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0], [b0 + 1.0, b1 + 1.5, 0, 0]]))


def test_gae_limits_lambda_one_and_zero():
    rewards = torch.tensor([[0.2, -0.1, 1.0]])
    values = torch.tensor([[0.3, 0.4, 0.5]])
    mask = torch.ones(1, 3)
    gamma = 0.9
    # lam = 1: Monte-Carlo return minus V
    mc = [0.2 + gamma * (-0.1) + gamma**2 * 1.0, -0.1 + gamma * 1.0, 1.0]
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[mc[0] - 0.3, mc[1] - 0.4, mc[2] - 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([mc]))
    # lam = 0: one-step TD error
    td = [0.2 + gamma * 0.4 - 0.3, -0.1 + gamma * 0.5 - 0.4, 1.0 - 0.5]
    torch.testing.assert_close(gae(rewards, values, mask, gamma=gamma, lam=0.0)[0], torch.tensor([td]))


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), gamma=1.0, lam=1.0)


def test_group_advantages_grpo_dr_grpo_rloo_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    grpo = group_advantages(rewards, 4, eps=1e-4)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert grpo[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]], rel=1e-6)
    assert grpo[4:].tolist() == [0.0] * 4  # identical rewards carry no signal
    assert group_advantages(rewards, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    rloo = group_advantages(rewards, 4, baseline="leave_one_out", scale="none")
    assert rloo[:4].tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    batch_std = torch.tensor(rewards.tolist()).std().item()
    batch = group_advantages(rewards, 4, scale="batch", eps=0.0)
    assert batch[0].item() == pytest.approx(0.5 / batch_std)
    assert set(ADVANTAGE_BASELINES) == {"mean", "leave_one_out"} and set(ADVANTAGE_SCALES) == {"std", "batch", "none"}


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(torch.zeros(4), 2, scale="mad")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1, baseline="leave_one_out")
