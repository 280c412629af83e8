"""GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300) and its RLOO / Dr. GRPO variants.

One training step samples ``group_size`` responses per prompt, scores them, turns the scores into group-relative
advantages (no value model), and maximises the clipped surrogate with a ``kl.coef``-weighted k3 KL to the reference
as a loss term. ``baseline: leave_one_out`` with ``scale: none`` is RLOO (https://arxiv.org/abs/2402.14740);
``scale: none`` with ``loss_aggregation: dr_grpo`` is Dr. GRPO (https://arxiv.org/abs/2503.20783). The loop, the KL
and the statistics are the online core's (:mod:`rlft.methods.online`).
"""

from __future__ import annotations

import torch

from rlft.methods.online import OnlineRL
from rlft.ops import ADVANTAGE_BASELINES, ADVANTAGE_SCALES, group_advantages
from rlft.outputs import LossOutput
from rlft.registry import resolve
from rlft.rl.kl import KLSettings
from rlft.rl.rollout import Rollout
from rlft.rl_losses import grpo_loss


class GRPO(OnlineRL):
    """Group Relative Policy Optimization.

    Hooks (see :mod:`rlft.methods.online`): :meth:`rollout`, :meth:`reward`, :meth:`shape_scores`,
    :meth:`advantages`, :meth:`policy_loss`. Metrics: ``train/reward`` (mean reward), ``train/score`` (after
    shaping: what the advantages are computed from), ``train/reward_std`` (mean within-group std), ``train/kl``
    (mean per-token KL estimate to the reference), ``train/entropy``, ``train/clipfrac``, ``train/approx_kl`` (to
    the rollout policy), ``train/policy_loss``, ``train/response_length``, ``train/stop_rate``,
    ``train/rollout_tokens_per_sec``, ``train/step_seconds``; ``val/loss`` and the same on validation prompts.

    ``trainer.max_steps`` counts optimiser updates: one per rollout by default, ``epochs *
    ceil(batch_size * group_size / minibatch_size)`` in general.

    Args:
        group_size: Responses per prompt (G).
        clip_range_high: Upper clip epsilon (DAPO's clip-higher); default ``clip_range``.
        baseline: ``mean`` (GRPO), ``leave_one_out`` (RLOO) or ``module:function``.
        scale: Advantage scaling: ``std`` (group std, GRPO), ``batch`` (batch std) or ``none`` (Dr. GRPO, RLOO).
        kl: The KL block (:class:`rlft.methods.online.KLSettings`); GRPO's default is ``{coef: 0.04, estimator:
            k3, placement: loss}``; ``coef: 0`` skips the reference forward.
        loss_aggregation: ``sequence`` (GRPO), ``token`` (DAPO/BNPO) or ``dr_grpo``.
    """

    default_kl = KLSettings(coef=0.04, estimator="k3", placement="loss")

    def __init__(
        self,
        model: str,
        group_size: int = 4,
        clip_range_high: float | None = None,
        baseline: str = "mean",
        scale: str = "std",
        kl: KLSettings = KLSettings(),
        loss_aggregation: str = "sequence",
        **kwargs,
    ) -> None:
        # a typo (or a module:function that does not import) fails here, not at the first step
        resolve(baseline, ADVANTAGE_BASELINES, "baseline")
        resolve(scale, ADVANTAGE_SCALES, "scale")
        if group_size < 2:  # every baseline is a per-prompt group statistic: one sample gives advantage 0
            raise ValueError(
                f"group_size={group_size} is too small: must be >= 2 (advantages compare the samples of one prompt)"
            )
        super().__init__(model, kl=kl, loss_aggregation=loss_aggregation, **kwargs)

    @property
    def samples_per_prompt(self) -> int:
        return self.hparams.group_size

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages ``[N]`` of the (shaped) scores, less the summed KL when it is in the reward."""
        hp = self.hparams
        if self.kl_settings.placement == "reward":  # each token's KL penalty comes off its sequence's score
            scores = self.token_rewards(rollout, scores).sum(-1)
        return group_advantages(scores, hp.group_size, baseline=hp.baseline, scale=hp.scale)

    def policy_loss(self, batch: Rollout, logps: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
        """The clipped GRPO surrogate (:func:`rlft.rl_losses.grpo_loss`; the KL term is the core's)."""
        hp = self.hparams
        return grpo_loss(
            logps,
            batch.logps,
            None,
            advantages,
            batch.response_mask,
            clip_range=hp.clip_range,
            clip_range_high=hp.clip_range_high,
            beta=0.0,
            loss_aggregation=hp.loss_aggregation,
            max_new_tokens=self.sampling.max_new_tokens,
        )
