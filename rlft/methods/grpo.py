"""GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300) and its RLOO / Dr. GRPO variants.

One training step samples ``group_size`` responses per prompt, scores them, turns the scores into group-relative
advantages (no value model), and maximises the clipped surrogate with a ``beta``-weighted k3 KL to the reference as
a loss term. ``baseline: leave_one_out`` with ``scale: none`` is RLOO (https://arxiv.org/abs/2402.14740);
``scale: none`` with ``loss_aggregation: dr_grpo`` is Dr. GRPO (https://arxiv.org/abs/2503.20783).
"""

from __future__ import annotations

import time

import torch

from rlft.losses import grpo_loss
from rlft.methods.online import OnlineRL
from rlft.ops import ADVANTAGE_BASELINES, ADVANTAGE_SCALES, group_advantages, masked_mean
from rlft.registry import resolve
from rlft.rl.logps import token_logps
from rlft.rl.rewards import RewardSpec
from rlft.rl.rollout import Rollout, RolloutSettings, collect_rollout, minibatches
from rlft.rl_losses import LOSS_AGGREGATIONS
from rlft.strategies import full_weights


class GRPO(OnlineRL):
    """Group Relative Policy Optimization.

    Hooks (see :mod:`rlft.methods.online`): :meth:`rollout`, :meth:`reward`, :meth:`shape_scores`,
    :meth:`advantages`, :meth:`policy_loss`. Metrics: ``train/reward`` (mean reward), ``train/score`` (after
    shaping: what the advantages are computed from), ``train/reward_std`` (mean within-group std), ``train/kl``
    (mean per-token k3 KL to the reference), ``train/entropy``, ``train/clipfrac``, ``train/approx_kl`` (to the
    rollout policy), ``train/response_length``, ``train/stop_rate``, ``train/rollout_tokens_per_sec``,
    ``train/step_seconds``.

    ``trainer.max_steps`` counts optimiser updates: one per rollout by default, ``num_iterations *
    ceil(batch_size * group_size / minibatch_size)`` in general.

    Args:
        rewards: Reward sources summed with their weights (see :mod:`rlft.rl.rewards`).
        sampling: How responses are sampled (use ``temperature > 0``: a group of identical answers teaches nothing).
        group_size: Responses per prompt (G).
        beta: Weight of the KL-to-reference loss term; 0 skips the reference forward.
        clip_range: Ratio clip epsilon (lower bound; upper too unless ``clip_range_high``).
        clip_range_high: Upper clip epsilon (DAPO's clip-higher).
        baseline: ``mean`` (GRPO) or ``leave_one_out`` (RLOO).
        scale: Advantage scaling: ``std`` (group std, GRPO), ``batch`` (batch std) or ``none`` (Dr. GRPO, RLOO).
        loss_aggregation: ``sequence`` (GRPO), ``token`` (DAPO/BNPO) or ``dr_grpo``.
        num_iterations: Updates per rollout (mu of the paper); > 1 makes the ratio and clipping matter.
        minibatch_size: Sequences per optimiser step; default the whole rollout (``batch_size * group_size``).
        missing_eos_penalty: Subtract this from the score of responses cut at ``max_new_tokens`` (so a length
            reward cannot be met by a response that never ends).
        reference: Model string of a frozen reference; default the initial policy without a second copy of the
            base: the LoRA base with the adapter disabled, or, when ``model`` continues an adapter folder (e.g. an
            SFT result), a frozen copy of that adapter; a frozen copy of the policy when training all weights.
        max_grad_norm: Gradient clipping norm (``null`` disables).
    """

    default_lr = 1e-5

    def __init__(
        self,
        model: str,
        rewards: list[RewardSpec] | None = None,
        sampling: RolloutSettings = RolloutSettings(),
        group_size: int = 4,
        beta: float = 0.04,
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        baseline: str = "mean",
        scale: str = "std",
        loss_aggregation: str = "sequence",
        num_iterations: int = 1,
        minibatch_size: int | None = None,
        missing_eos_penalty: float | None = None,
        reference: str | None = None,
        max_grad_norm: float | None = 1.0,
        **kwargs,
    ) -> None:
        # a typo (or a module:function that does not import) fails here, not at the first step
        resolve(baseline, ADVANTAGE_BASELINES, "baseline")
        resolve(scale, ADVANTAGE_SCALES, "scale")
        resolve(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")
        if group_size < 2:  # every baseline is a per-prompt group statistic: one sample gives advantage 0
            raise ValueError(
                f"group_size={group_size} is too small: must be >= 2 (advantages compare the samples of one prompt)"
            )
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        super().__init__(model, **kwargs)
        self.init_online(rewards, sampling, reference=reference, use_reference=beta != 0)

    # ------------------------------------------------------------------ hooks a subclass overrides
    def rollout(self, batch: dict) -> Rollout:
        """``group_size`` samples per prompt, with reference log-probs (``beta != 0``) and old log-probs (when the
        policy changes before the last update of this rollout)."""
        hp = self.hparams
        rows = batch["prompt_input_ids"].shape[0] * hp.group_size
        several_updates = hp.num_iterations > 1 or (hp.minibatch_size or rows) < rows
        with full_weights(self):  # sharded weights gathered once per rollout, not per decoding step
            return collect_rollout(
                self.model, self.tokenizer, batch, self.sampling, group_size=hp.group_size, score=several_updates,
                reference=self.reference_model, with_reference=hp.beta != 0,
            )  # fmt: skip

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages ``[N]`` of the (shaped) scores."""
        hp = self.hparams
        return group_advantages(scores, hp.group_size, baseline=hp.baseline, scale=hp.scale)

    def policy_loss(
        self, logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """Per-sequence losses ``[n]`` and statistics for one minibatch (``[n, R]`` log-probs and mask, ``[n]``
        advantages); the default is the clipped GRPO surrogate with the KL term (:func:`rlft.losses.grpo_loss`)."""
        hp = self.hparams
        return grpo_loss(
            logps, old_logps, ref_logps, advantages, mask, clip_range=hp.clip_range,
            clip_range_high=hp.clip_range_high, beta=hp.beta, loss_aggregation=hp.loss_aggregation,
            max_length=self.sampling.max_new_tokens,
        )  # fmt: skip

    # ------------------------------------------------------------------ update
    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        rollout = self.rollout(batch)
        raw, shaped = self.score(rollout)
        stats = self.optimise(rollout, self.advantages(rollout, shaped))
        metrics = self.rollout_metrics(rollout, raw, shaped, started)
        metrics["reward_std"] = raw.view(-1, hp.group_size).std(-1).mean() if hp.group_size > 1 else torch.zeros(())
        self.log_step(rollout, raw, {**metrics, **stats})

    def optimise(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """``num_iterations`` passes over minibatches of one rollout; returns the means of the statistics."""
        hp = self.hparams
        mask = rollout.response_mask.float()
        length = rollout.response_ids.shape[1]
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.num_iterations):
            for rows in minibatches(len(rollout), hp.minibatch_size):
                rows = rows.to(self.device)
                part = rollout.select(rows)
                logps, entropy, _ = token_logps(
                    self.model, part.input_ids, part.attention_mask, length, temperature=self.sampling.temperature,
                    with_entropy=True, share_prompts=self.sampling.share_prompts,
                )  # fmt: skip
                # one update per rollout: the rollout policy is the current one, so the ratio is exactly 1
                old = part.logps if part.logps is not None else logps.detach()
                losses, loss_stats = self.policy_loss(logps, old, part.ref_logps, advantages[rows], mask[rows])
                loss = losses.mean()
                if hp.loss_aggregation == "token":  # a token mean over the global minibatch, not each rank's own
                    loss = loss * self.token_share(mask[rows])
                self.optimizer_update(loss)
                step = {
                    "loss": self.mean_over_processes(loss.detach()),
                    "entropy": masked_mean(entropy, mask[rows]),
                    "approx_kl": masked_mean(0.5 * (logps.detach() - old) ** 2, mask[rows]),
                    **{k: v.mean() for k, v in loss_stats.items()},
                }
                for key, value in step.items():
                    totals.setdefault(key, []).append(value)
        return {k: torch.stack(v).mean() for k, v in totals.items()}
