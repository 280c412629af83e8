"""K-wise ranking losses against hand-computed values, and their reduction to Bradley-Terry at K = 2."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.losses import LOSSES, bradley_terry_loss
from rlft.ranking_losses import kwise_bradley_terry_loss, plackett_luce_loss


def _nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_plackett_luce_by_hand_with_a_padded_row():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: pick 2.0 of {2, 1, 0}, then 1.0 of {1, 0}; row 1 (K = 2; the 9.0 is padding) is Bradley-Terry
    row0 = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    expected = torch.tensor([row0, _nls(1.0)])
    torch.testing.assert_close(plackett_luce_loss(rewards, mask), expected)


def test_kwise_bradley_terry_averages_all_pairs_by_hand():
    rewards = torch.tensor([[2.0, 1.0, 0.0]])
    expected = (_nls(1.0) + _nls(2.0) + _nls(1.0)) / 3  # pairs (1,2), (1,3), (2,3)
    assert kwise_bradley_terry_loss(rewards).item() == pytest.approx(expected)


def test_both_reduce_to_bradley_terry_for_pairs_and_prefer_the_right_order():
    chosen, rejected = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 2.0])
    bt = bradley_terry_loss(chosen, rejected).losses
    stacked = torch.stack([chosen, rejected], dim=1)
    torch.testing.assert_close(plackett_luce_loss(stacked), bt)
    torch.testing.assert_close(kwise_bradley_terry_loss(stacked), bt)
    right, wrong = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    for loss in (plackett_luce_loss, kwise_bradley_terry_loss):
        assert loss(right).item() < loss(wrong).item()
    assert LOSSES["plackett_luce"] is plackett_luce_loss


def test_gradient_pushes_the_best_up_and_the_worst_down():
    rewards = torch.zeros(1, 4, requires_grad=True)
    plackett_luce_loss(rewards).sum().backward()
    grad = rewards.grad[0]
    assert grad[0] < 0 < grad[3] and torch.all(grad[:-1] <= grad[1:])  # descending the loss raises r_1 most


@pytest.mark.parametrize(
    ("rewards", "mask", "message"),
    [
        (torch.zeros(3), None, r"\[B, K\]"),
        (torch.zeros(1, 3), torch.tensor([[1, 0, 0]]), "at least 2"),
        (torch.zeros(1, 3), torch.tensor([[1, 0, 1]]), "prefix"),
    ],
)
def test_bad_shapes_and_masks_are_rejected(rewards, mask, message):
    with pytest.raises(ValueError, match=message):
        plackett_luce_loss(rewards, mask)
