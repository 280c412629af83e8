"""Reward-model losses over K-wise rankings: each prompt's K responses scored in one forward, best first.

Pure functions on tensors, like :mod:`rlft.losses` (whose ``LOSSES`` registry also holds them by name). Rewards are
``[B, K]`` with an optional ``[B, K]`` mask marking a prefix of each row, for rankings shorter than K; each loss
returns the per-prompt ``[B]`` tensor alone. ``RANKING_LOSSES`` maps their names; ``RewardModel(ranking_loss=...)``
selects one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["RANKING_LOSSES", "kwise_bradley_terry_loss", "plackett_luce_loss"]


def _check_ranking(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rankings are [B, K] rewards (best first), got shape {tuple(rewards.shape)}")
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from rewards shape {tuple(rewards.shape)}")
    if (mask.sum(-1) < 2).any():
        raise ValueError("every ranking needs at least 2 responses")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must mark a prefix of each row (responses best first, padding at the end)")
    return mask


def kwise_bradley_terry_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""InstructGPT's reward-model loss over a ranking of K responses: every one of the :math:`\binom{K}{2}` pairs
    from one forward, averaged per prompt (https://arxiv.org/abs/2203.02155, eq. 1).

    .. math:: L_i = -\frac{1}{\binom{K_i}{2}} \sum_{j < l \le K_i} \log \sigma(r_{i,j} - r_{i,l})

    Args:
        rewards: ``[B, K]`` rewards of each prompt's responses, **best first**.
        mask: ``[B, K]`` 1 for real responses (a prefix of each row), for rankings shorter than K.

    Returns:
        ``[B]`` per-prompt losses.
    """
    mask = _check_ranking(rewards, mask)
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, j, l]: r_j - r_l
    k = rewards.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    losses = -(F.logsigmoid(diff) * pairs).sum((1, 2))
    return losses / pairs.sum((1, 2))


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Listwise Plackett-Luce negative log-likelihood of a full ranking (best first): the best response is picked
    from all K by a softmax over rewards, the second from the remaining K-1, and so on (Plackett 1975; Luce 1959;
    used for LLM preferences by DPO's appendix A.3, https://arxiv.org/abs/2305.18290, and by Song et al. 2023, PRO).

    .. math:: L_i = -\sum_{j=1}^{K_i - 1} \Big( r_{i,j} - \log \sum_{l=j}^{K_i} e^{r_{i,l}} \Big)

    With K = 2 it is the Bradley-Terry loss :math:`-\log\sigma(r_1 - r_2)`.

    Args:
        rewards: ``[B, K]`` rewards, **best first**.
        mask: ``[B, K]`` 1 for real responses (a prefix of each row).

    Returns:
        ``[B]`` per-prompt losses (summed over the K-1 choices).
    """
    mask = _check_ranking(rewards, mask)
    masked = rewards.masked_fill(~mask, float("-inf"))
    # logsumexp over the suffix l >= j: a reversed cumulative logsumexp
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    last = mask.sum(-1, keepdim=True) - 1  # the final pick has probability 1: no term
    choice = mask & (torch.arange(rewards.shape[1], device=rewards.device)[None] < last)
    terms = torch.where(choice, rewards - tail, torch.zeros_like(rewards))
    return -terms.sum(-1)


RANKING_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "kwise_bradley_terry": kwise_bradley_terry_loss,
    "plackett_luce": plackett_luce_loss,
}
"""Reward-model losses over K-wise rankings (``[B, K]`` rewards, best first), by name."""
