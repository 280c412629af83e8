"""KTO's loss (rlft.unpaired_losses): hand-computed values, and parity with TRL 1.16's ``KTOTrainer`` (a test-only
oracle) on identical random inputs.

TRL 1.16 computes the KTO loss inside ``KTOTrainer._compute_loss`` (there is no separate ``kto_loss`` method any
more); as in ``test_math_trl_parity.py`` it is called unbound on a stand-in ``self`` with precomputed reference
log-probs and a stand-in model that returns fixed per-token log-probs, so the number that comes back is TRL's
arithmetic on our inputs.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlft.unpaired_losses import kto_kl, kto_loss  # noqa: E402

ATOL = 1e-6


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ by hand
def test_kto_loss_by_hand():
    policy = torch.tensor([-5.0, -6.0, -4.0, -3.0], dtype=torch.float64)
    reference = torch.tensor([-5.5, -5.0, -4.0, -3.5], dtype=torch.float64)
    labels = torch.tensor([True, False, True, False])
    beta, kl, wd, wu = 0.1, 0.2, 2.0, 0.5
    losses, stats = kto_loss(policy, reference, labels, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    # log-ratios 0.5, -1, 0, 0.5: desirable rows pay 1 - sigmoid(beta (r - z)), undesirable 1 - sigmoid(beta (z - r))
    expected = [
        wd * (1 - sigmoid(0.1 * (0.5 - 0.2))),
        wu * (1 - sigmoid(0.1 * (0.2 + 1.0))),
        wd * (1 - sigmoid(0.1 * (0.0 - 0.2))),
        wu * (1 - sigmoid(0.1 * (0.2 - 0.5))),
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert stats["rewards"].tolist() == pytest.approx([0.05, -0.1, 0.0, 0.05], abs=1e-7)
    assert stats["chosen_rewards"].tolist() == pytest.approx([0.05, 0.0], abs=1e-7)
    assert stats["rejected_rewards"].tolist() == pytest.approx([-0.1, 0.05], abs=1e-7)
    assert float(stats["kl"]) == pytest.approx(0.2)


def test_kto_loss_at_policy_equal_reference_is_half_the_weight():
    logps = torch.tensor([-3.0, -7.0, -1.5])
    labels = torch.tensor([True, False, False])
    losses, _ = kto_loss(logps, logps.clone(), labels, 0.0, desirable_weight=1.5, undesirable_weight=1.0)
    assert losses.tolist() == [0.75, 0.5, 0.5]


def test_gradient_pushes_desirable_up_and_undesirable_down_and_not_through_kl():
    policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    kl_source = torch.tensor([0.3], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), kl_source * 1)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable log-prob, lowers the undesirable
    assert kl_source.grad is None  # the reference point is detached


def test_kto_kl_is_the_clamped_detached_mean():
    policy = torch.tensor([-2.0, -4.0, -3.0], requires_grad=True)
    reference = torch.tensor([-2.5, -3.0, -3.2])
    kl = kto_kl(policy, reference)  # mean(0.5, -1.0, 0.2) < 0: clamped to 0
    assert float(kl) == 0.0 and not kl.requires_grad
    kl = kto_kl(reference, policy.detach())
    assert float(kl) == pytest.approx((-0.5 + 1.0 - 0.2) / 3)
    # data parallel: the processes' means are averaged before the clamp (TRL: gather, mean, clamp)
    averaged = kto_kl(policy, reference, all_reduce_mean=lambda x: (x + torch.tensor(1.0)) / 2)
    assert float(averaged) == pytest.approx((0.5 - 1.0 + 0.2) / 3 / 2 + 0.5)


def test_kto_loss_refuses_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(x, x, torch.tensor([1, 0, 1]), 0.0)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        kto_loss(x, torch.zeros(2), torch.ones(3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), 0.0, beta=0.0)


# ------------------------------------------------------------------------------------------------ TRL parity
class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    def gather_for_metrics(self, x):
        return x


def _token_logps(gen: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A completion mask (prompt, completion, padding) and per-token log-probs, 0 where the label is -100."""
    prompt = torch.randint(1, 4, (rows,), generator=gen)
    completion = torch.randint(1, length - 4, (rows,), generator=gen)
    positions = torch.arange(length)
    mask = ((positions >= prompt[:, None]) & (positions < (prompt + completion)[:, None])).long()
    return mask, -3 * torch.rand(rows, length - 1, generator=gen, dtype=torch.float64) * mask[:, 1:]


def _trl_kto(main, kl_rows, labels, ref_logps, ref_kl_logps, *, beta, desirable_weight, undesirable_weight):
    """``KTOTrainer._compute_loss`` on a stand-in model returning ``main`` / ``kl_rows`` ``(mask, token_logps)``."""
    from trl.trainer.kto_trainer import KTOTrainer

    def outputs(token_logps):
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros)

    inputs = {
        "input_ids": torch.ones_like(main[0]),
        "attention_mask": torch.ones_like(main[0]),
        "completion_mask": main[0],
        "KL_input_ids": torch.ones_like(kl_rows[0]),
        "KL_attention_mask": torch.ones_like(kl_rows[0]),
        "KL_completion_mask": kl_rows[0],
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }

    def model(**kwargs):
        return outputs(kl_rows[1] if kwargs["input_ids"] is inputs["KL_input_ids"] else main[1])

    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=_Accelerator(),
        _metrics={"eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    stub._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(stub, m, batch)
    loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, stub._metrics["eval"]


@pytest.mark.parametrize(("beta", "desirable_weight", "undesirable_weight"), [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_matches_trl_kto_trainer(beta, desirable_weight, undesirable_weight, seed):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(seed)
    batch, length = 6, 12
    main, kl_rows = _token_logps(gen, batch, length), _token_logps(gen, batch, length)
    labels = torch.tensor([True, False, True, True, False, False])[torch.randperm(batch, generator=gen)]
    # a policy near the reference in both directions, so the KL point is sometimes clamped, sometimes not
    ref_logps = main[1].sum(1) + 2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1
    ref_kl_logps = kl_rows[1].sum(1) + 2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1.5 + 0.5 * seed
    weights = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trl_loss, metrics = _trl_kto(main, kl_rows, labels, ref_logps, ref_kl_logps, **weights)

    kl = kto_kl(kl_rows[1].sum(1), ref_kl_logps)
    losses, stats = kto_loss(main[1].sum(1), ref_logps, labels, kl, **weights)
    differences = [
        abs(losses.mean().item() - trl_loss.item()),
        abs(float(kl) - metrics["kl"][0]),
        abs(stats["chosen_rewards"].mean().item() - metrics["rewards/chosen"][0]),
        abs(stats["rejected_rewards"].mean().item() - metrics["rewards/rejected"][0]),
    ]
    # per example: TRL reduces with a mean, so give it one row at a time (with the whole batch's KL rows)
    for i in range(batch):
        one = (main[0][i : i + 1], main[1][i : i + 1])
        row_loss, _ = _trl_kto(one, kl_rows, labels[i : i + 1], ref_logps[i : i + 1], ref_kl_logps, **weights)
        differences.append(abs(losses[i].item() - row_loss.item()))
    print(f"\nKTO vs TRL (beta {beta}, seed {seed}, kl {float(kl):.4f}): max abs diff {max(differences):.2e}")
    assert max(differences) <= ATOL
