"""REINFORCE++ (Hu et al. 2025, https://arxiv.org/abs/2501.03262), OpenRLHF's critic-free estimator, on the
online-RL core.

Each token's reward is ``-kl_coef * KL_t`` to the reference, plus the sequence score on the last response token;
the advantage of a token is its return (the sum of rewards from it to the end, gamma = 1), normalised over the
**whole global batch** (not per prompt group, which is what makes it "++": no group baseline, no value model);
the update is PPO's clipped surrogate.
"""

from __future__ import annotations

import time

import torch

from rlft.losses import ppo_policy_loss
from rlft.methods.online import OnlineRL
from rlft.methods.ppo import last_token_scores
from rlft.ops import KL_ESTIMATORS, gae, kl_estimate, masked_mean, masked_whiten
from rlft.registry import resolve
from rlft.rl.logps import token_logps
from rlft.rl.rewards import RewardSpec
from rlft.rl.rollout import Rollout, RolloutSettings, collect_rollout, minibatches
from rlft.strategies import full_weights


class ReinforcePP(OnlineRL):
    """REINFORCE++. Logs what GRPO logs plus ``train/kl`` (summed per-token KL of each sequence, averaged).

    Args:
        rewards: Reward sources summed with their weights (see :mod:`rlft.rl.rewards`).
        sampling: How responses are sampled.
        kl_coef: Weight of the per-token KL penalty in the reward (0 skips the reference).
        kl_estimator: ``k1``, ``k2``, ``k3`` (see :func:`rlft.ops.kl_estimate`) or ``module:function``.
        clip_range: PPO ratio clip epsilon.
        ppo_epochs: Passes over each rollout.
        minibatch_size: Sequences per optimiser step; default the whole rollout.
        missing_eos_penalty: Subtract this from the score of responses cut at ``max_new_tokens``.
        reference: Model string of a frozen reference (default: see :class:`rlft.methods.GRPO`).
        max_grad_norm: Gradient clipping norm (``null`` disables).
    """

    default_lr = 1e-5

    def __init__(
        self,
        model: str,
        rewards: list[RewardSpec] | None = None,
        sampling: RolloutSettings = RolloutSettings(),
        kl_coef: float = 0.01,
        kl_estimator: str = "k1",
        clip_range: float = 0.2,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        missing_eos_penalty: float | None = None,
        reference: str | None = None,
        max_grad_norm: float | None = 1.0,
        **kwargs,
    ) -> None:
        resolve(kl_estimator, KL_ESTIMATORS, "KL estimator")  # a typo fails here, not at the first step
        super().__init__(model, **kwargs)
        self.init_online(rewards, sampling, reference=reference, use_reference=kl_coef > 0)

    def rollout(self, batch: dict) -> Rollout:
        """One sample per prompt with its old log-probs (the KL reward needs them) and reference log-probs."""
        with full_weights(self):
            return collect_rollout(
                self.model, self.tokenizer, batch, self.sampling, score=True,
                reference=self.reference_model, with_reference=self.hparams.kl_coef > 0,
            )  # fmt: skip

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns-to-go of the KL-penalised token rewards, whitened over the global batch; and the per-token KL."""
        mask = rollout.response_mask.to(scores.dtype)
        kl = torch.zeros_like(mask)
        if rollout.ref_logps is not None:
            kl = kl_estimate(rollout.logps, rollout.ref_logps, kind=self.hparams.kl_estimator) * mask
        rewards = last_token_scores(scores, mask) - self.hparams.kl_coef * kl
        # with no value model (values 0) and gamma = lambda = 1, GAE's advantage is the plain return-to-go
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
        return masked_whiten(returns, mask, all_reduce=self.sum_over_processes) * mask, kl

    def policy_loss(self, logps, old_logps, advantages, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=self.hparams.clip_range)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        rollout = self.rollout(batch)
        raw, shaped = self.score(rollout)
        advantages, kl = self.advantages(rollout, shaped)
        mask, length = rollout.response_mask.float(), rollout.response_ids.shape[1]
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.ppo_epochs):
            for rows in minibatches(len(rollout), hp.minibatch_size):
                rows = rows.to(self.device)
                part = rollout.select(rows)
                logps, entropy, _ = token_logps(
                    self.model, part.input_ids, part.attention_mask, length, temperature=self.sampling.temperature,
                    with_entropy=True, share_prompts=self.sampling.share_prompts,
                )  # fmt: skip
                losses, stats = self.policy_loss(logps, part.logps, advantages[rows], mask[rows])
                loss = losses.mean() * self.token_share(mask[rows])  # a token mean over the global minibatch
                self.optimizer_update(loss)
                step = {"loss": self.mean_over_processes(loss.detach()), **stats}
                step["entropy"] = masked_mean(entropy, mask[rows])
                for key, value in step.items():
                    totals.setdefault(key, []).append(value.mean())
        metrics = {**self.rollout_metrics(rollout, raw, shaped, started), "kl": kl.sum(-1).mean()}
        self.log_step(rollout, raw, {**metrics, **{k: torch.stack(v).mean() for k, v in totals.items()}})
