"""PPO for language models (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022).

One training step = one rollout: sample responses to the batch's prompts, score them with the reward sources, turn
the score into per-token rewards (score on the last response token minus ``kl_coef`` times the per-token KL to the
reference), estimate advantages with GAE, then run ``ppo_epochs`` passes of clipped PPO updates over minibatches,
stopping early when the approximate KL to the rollout policy passes ``target_approx_kl``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rlft.losses import ppo_policy_loss, ppo_value_loss
from rlft.methods.online import OnlineRL
from rlft.models import load_model
from rlft.models.modes import disable_dropout, inference
from rlft.ops import KL_ESTIMATORS, gae, kl_estimate, masked_mean, masked_var, masked_whiten
from rlft.registry import resolve
from rlft.rl.logps import token_logps
from rlft.rl.rewards import RewardSpec
from rlft.rl.rollout import Rollout, RolloutSettings, collect_rollout, minibatches
from rlft.strategies import full_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)  # frozen: a default instance is shared by every signature that uses it
class KLSettings:
    """KL penalty in the reward: ``r_t -= coef * KL_t`` per response token.

    Args:
        coef: Initial (or fixed) coefficient; 0 switches the penalty and the reference forward off.
        estimator: Per-token estimator of ``KL(pi || ref)``: ``k1`` (``log pi - log ref``, as TRL/Ziegler), ``k2``,
            ``k3`` or ``module:function`` (see :func:`rlft.ops.kl_estimate`).
        target: Adaptive controller (Ziegler et al.): steer the coefficient so the mean per-sequence KL approaches
            this value; ``null`` keeps ``coef`` fixed.
        horizon: Adaptive controller horizon in sequences (larger = slower adaptation).
    """

    coef: float = 0.05
    estimator: str = "k1"
    target: float | None = None
    horizon: int = 10_000

    def __post_init__(self) -> None:
        resolve(self.estimator, KL_ESTIMATORS, "KL estimator")  # a typo fails here, not at the first step

    def update(self, coef: float, observed_kl: float, sequences: int) -> float:
        """Next coefficient of the adaptive controller (unchanged when ``target`` is null)."""
        if self.target is None:
            return coef
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        return coef * (1.0 + error * sequences / self.horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over response tokens (1 = perfect critic, <= 0 = useless)."""
    if mask.sum() < 2:
        return torch.zeros(())
    var = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var.clamp(min=1e-8)


def last_token_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, R]`` tensor with each row's score on its last response token (right-padded mask), zeros elsewhere."""
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    placed = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device)
    placed[torch.arange(mask.shape[0], device=mask.device), last] = scores
    return placed


class PPO(OnlineRL):
    """Proximal Policy Optimization with a value head, a KL-penalised reward and GAE.

    Override :meth:`reward` (or set ``rewards``) to change what is optimised and :meth:`rollout` to change how
    responses are produced. Metrics: ``train/reward`` (mean reward), ``train/score`` (after the missing-EOS penalty
    and clipping, before the KL penalty), ``train/kl`` (mean over
    sequences of the summed per-token KL, what the adaptive controller steers), ``train/kl_coef``,
    ``train/entropy``, ``train/clipfrac``, ``train/approx_kl``, ``train/value_loss``, ``train/policy_loss``,
    ``train/explained_variance``, ``train/response_length``, ``train/stop_rate``, ``train/ppo_epochs``,
    ``train/rollout_tokens_per_sec`` and ``train/step_seconds``.

    ``trainer.max_steps`` counts optimiser updates (Lightning's convention for manual optimisation): each rollout
    makes ``ppo_epochs * ceil(rollout size / minibatch_size)`` of them, fewer when the epochs stop early.

    Args:
        rewards: Reward sources summed with their weights (see :mod:`rlft.rl.rewards`).
        sampling: How responses are sampled.
        kl: KL penalty (fixed or adaptive).
        ppo_epochs: Passes over each rollout.
        minibatch_size: Sequences per optimiser step; default the whole rollout.
        clip_range: PPO ratio clip epsilon.
        clip_range_value: Value clip epsilon.
        vf_coef: Weight of the value loss.
        gamma: Discount.
        lam: GAE lambda.
        whiten_rewards: Whiten the per-token rewards of each rollout (scale only, as TRL).
        reward_clip: Clip scores to ``[-reward_clip, reward_clip]`` before the KL penalty.
        missing_eos_penalty: Subtract this from the score of responses cut at ``max_new_tokens``.
        target_approx_kl: Stop a rollout's epochs early once the mean approx-KL of an epoch passes this.
        critic: ``null`` puts the value head on the policy trunk; a model string trains a separate critic (with
            the policy's LoRA, quantization, gradient checkpointing and attention settings) instead.
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
        kl: KLSettings = KLSettings(),
        ppo_epochs: int = 4,
        minibatch_size: int | None = None,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_rewards: bool = False,
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        target_approx_kl: float | None = None,
        critic: str | None = None,
        reference: str | None = None,
        max_grad_norm: float | None = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        self.kl_settings = KLSettings(**kl) if isinstance(kl, dict) else kl
        self.kl_coef = self.kl_settings.coef
        self.init_online(rewards, sampling, reference=reference, use_reference=self.kl_coef > 0)
        self.critic = None
        self.value_head = None

    def on_model_built(self) -> None:
        super().on_model_built()
        hp = self.hparams
        if hp.critic is not None:
            # loaded as the policy is: a critic without the run's checkpointing or quantization would silently
            # hold its activations or full-precision weights
            self.critic = load_model(
                hp.critic, dtype=hp.dtype, lora=self.lora_settings, quantization=hp.quantization,
                gradient_checkpointing=hp.gradient_checkpointing, attn_implementation=hp.attn_implementation,
            )  # fmt: skip
            disable_dropout(self.critic)
        trunk = self.critic if self.critic is not None else self.model
        hidden = trunk.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        # a zero head predicts 0 at first, so early advantages are the plain rewards rather than noise
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    # ------------------------------------------------------------------ hooks a subclass overrides
    def rollout(self, batch: dict) -> Rollout:
        """Sample responses for a prompts batch with old and reference log-probs and old values."""
        shared_trunk = self.critic is None
        # sharded weights gathered once for the whole rollout (sampling, old log-probs, values), not per step
        with full_weights(self):
            rollout = collect_rollout(
                self.model, self.tokenizer, batch, self.sampling, score=not shared_trunk,
                reference=self.reference_model, with_reference=self.kl_coef > 0,
            )  # fmt: skip
            with inference(self):
                if shared_trunk:
                    # one forward gives the old log-probs and the trunk states the value head reads
                    rollout.logps, _, hidden = token_logps(
                        self.model, rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1],
                        temperature=self.sampling.temperature, with_hidden=True,
                        share_prompts=self.sampling.share_prompts,
                    )  # fmt: skip
                    rollout.values = self.values(rollout, hidden)
                else:
                    rollout.values = self.values(rollout)
        return rollout

    # ------------------------------------------------------------------ pieces of the update
    def values(self, rollout: Rollout, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Value estimates ``[N, R]`` of the states before each response token."""
        if hidden is None:
            trunk = self.critic if self.critic is not None else self.model
            length = rollout.response_ids.shape[1]
            _, _, hidden = token_logps(trunk, rollout.input_ids, rollout.attention_mask, length, with_hidden=True,
                                       with_logps=False, share_prompts=self.sampling.share_prompts)  # fmt: skip
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def token_rewards(self, rollout: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards (score on the last token, minus the KL penalty) and the per-token KL."""
        mask = rollout.response_mask.to(scores.dtype)
        kl = torch.zeros_like(mask)
        if rollout.ref_logps is not None:
            kl = kl_estimate(rollout.logps, rollout.ref_logps, kind=self.kl_settings.estimator) * mask
        rewards = last_token_scores(scores, mask) - self.kl_coef * kl
        if self.hparams.whiten_rewards and self.sum_over_processes(mask.sum()) > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=self.sum_over_processes) * mask
        return rewards, kl

    def shape_scores(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """The missing-EOS penalty (see :class:`OnlineRL`), then clipping to ``[-reward_clip, reward_clip]``."""
        scores = super().shape_scores(rollout, scores)
        if self.hparams.reward_clip is not None:
            scores = scores.clamp(-self.hparams.reward_clip, self.hparams.reward_clip)
        return scores

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GAE advantages (whitened over the global batch) and returns ``[N, R]``, and the per-token KL."""
        hp = self.hparams
        rewards, kl = self.token_rewards(rollout, scores)
        mask = rollout.response_mask.to(rewards.dtype)
        advantages, returns = gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)
        if self.sum_over_processes(mask.sum()) > 1:
            # the global batch's statistics, so N processes compute what one process would on the same batch
            advantages = masked_whiten(advantages, mask, all_reduce=self.sum_over_processes) * mask
        return advantages, returns, kl

    def policy_loss(
        self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sequence clipped PPO surrogate losses ``[n]`` and statistics (:func:`rlft.losses.ppo_policy_loss`)."""
        return ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=self.hparams.clip_range)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        started = time.perf_counter()
        rollout = self.rollout(batch)
        raw, shaped = self.score(rollout)
        advantages, returns, kl = self.advantages(rollout, shaped)
        stats = self.optimise(rollout, advantages, returns)
        sequences = self.sum_over_processes(torch.tensor(float(len(rollout)), device=kl.device))
        sequence_kl = self.sum_over_processes(kl.sum()) / sequences
        # every rank must hold the same coefficient: it is updated from the global KL
        self.kl_coef = self.kl_settings.update(self.kl_coef, float(sequence_kl), int(sequences))
        mask = rollout.response_mask.to(returns.dtype)
        metrics = {
            **self.rollout_metrics(rollout, raw, shaped, started),
            "kl": sequence_kl,
            "kl_coef": torch.tensor(self.kl_coef),
            "explained_variance": explained_variance(rollout.values, returns, mask),
            **stats,
        }
        self.log_step(rollout, raw, metrics)

    def optimise(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """PPO epochs over minibatches of one rollout; returns the means of the update statistics."""
        hp = self.hparams
        mask = rollout.response_mask.float()
        length = rollout.response_ids.shape[1]
        totals: dict[str, list[torch.Tensor]] = {}
        epochs_done = 0
        for _ in range(hp.ppo_epochs):
            epoch_kl = []
            for rows in minibatches(len(rollout), hp.minibatch_size):
                rows = rows.to(self.device)
                part = rollout.select(rows)
                shared_trunk = self.critic is None
                logps, entropy, hidden = token_logps(
                    self.model, part.input_ids, part.attention_mask, length, temperature=self.sampling.temperature,
                    with_entropy=True, with_hidden=shared_trunk, share_prompts=self.sampling.share_prompts,
                )  # fmt: skip
                values = self.values(part, hidden if shared_trunk else None)
                policy_losses, policy_stats = self.policy_loss(logps, part.logps, advantages[rows], mask[rows])
                value_losses, value_stats = ppo_value_loss(
                    values, part.values, returns[rows], mask[rows], clip_range_value=hp.clip_range_value
                )
                # both are token means: weighted by this rank's share of the global minibatch's tokens
                loss = (policy_losses.mean() + hp.vf_coef * value_losses.mean()) * self.token_share(mask[rows])
                self.optimizer_update(loss)
                step = {
                    "loss": self.mean_over_processes(loss.detach()),
                    "policy_loss": policy_losses.detach().mean(),
                    "value_loss": value_losses.detach().mean(),
                    "entropy": masked_mean(entropy, mask[rows]),
                    **{k: v.mean() for k, v in {**policy_stats, **value_stats}.items()},
                }
                for key, value in step.items():
                    totals.setdefault(key, []).append(value)
                epoch_kl.append(step["approx_kl"])
            epochs_done += 1
            # the stop decision is taken on the mean over ranks: a rank stopping alone would hang the others
            epoch_kl = self.sum_over_processes(torch.stack(epoch_kl).mean()) / self.trainer.world_size
            if hp.target_approx_kl is not None and epoch_kl > hp.target_approx_kl:
                break
        means = {k: torch.stack(v).mean() for k, v in totals.items()}
        means["ppo_epochs"] = torch.tensor(float(epochs_done))
        return means

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.critic is not None:
            self.critic.train()

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rlft_kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # restores the sampling RNG: without it a resume samples anew
        self.kl_coef = checkpoint.get("rlft_kl_coef", self.kl_coef)
