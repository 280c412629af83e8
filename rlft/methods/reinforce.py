"""REINFORCE++ (Hu et al. 2025, https://arxiv.org/abs/2501.03262), OpenRLHF's critic-free estimator, on the
online-RL core.

Each token's reward is ``-kl.coef * KL_t`` to the reference, plus the sequence score on the last response token;
the advantage of a token is its return (the sum of rewards from it to the end, gamma = 1), normalised over the
**whole global batch** (not per prompt group, which is what makes it "++": no group baseline, no value model);
the update is PPO's clipped surrogate (the core's default :meth:`policy_loss`).
"""

from __future__ import annotations

import torch

from rlft.methods.online import OnlineRL
from rlft.ops import gae, masked_whiten
from rlft.rl.kl import KLSettings
from rlft.rl.rollout import Rollout


class ReinforcePP(OnlineRL):
    """REINFORCE++. Logs what GRPO logs plus ``train/kl_sequence`` (summed per-token KL of each sequence).

    Args:
        kl: The KL block (:class:`rlft.methods.online.KLSettings`); REINFORCE++'s default is ``{coef: 0.01,
            estimator: k1, placement: reward}``.
    """

    default_kl = KLSettings(coef=0.01, estimator="k1", placement="reward")

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Returns-to-go of the KL-penalised token rewards ``[N, R]``, whitened over the global batch."""
        rewards = self.token_rewards(rollout, scores)
        mask = rollout.response_mask.to(rewards.dtype)
        # with no value model (values 0) and gamma = lambda = 1, GAE's advantage is the plain return-to-go
        # skip_gaps: a multi-turn trajectory's environment tokens are not time steps
        returns, _ = gae(
            rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0, skip_gaps=rollout.env_mask is not None
        )
        return masked_whiten(returns, mask, all_reduce=self.sum_over_processes) * mask
