"""PPO for language models (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022).

One training step = one rollout: sample responses to the batch's prompts, score them with the reward sources, turn
the score into per-token rewards (score on the last response token minus ``kl.coef`` times the per-token KL to the
reference), estimate advantages with GAE, then run ``epochs`` passes of clipped PPO updates over minibatches,
stopping early when the approximate KL to the rollout policy passes ``target_approx_kl``. The loop is the online
core's (:mod:`rlft.methods.online`); PPO adds the value head and its loss (:meth:`PPO.auxiliary_loss`).
"""

from __future__ import annotations

import logging

import torch

from rlft.data.batches import PromptBatch
from rlft.methods.online import OnlineRL
from rlft.methods.online_update import ScoredTokens
from rlft.models import load_model
from rlft.models.modes import disable_dropout, inference
from rlft.models.reward import REWARD_HEADS
from rlft.ops import gae, masked_var, masked_whiten
from rlft.outputs import LossOutput
from rlft.registry import resolve
from rlft.rl.kl import KLSettings
from rlft.rl.logps import token_logps
from rlft.rl.rollout import Rollout
from rlft.rl_losses import ppo_value_loss
from rlft.strategies import full_weights

log = logging.getLogger(__name__)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over response tokens (1 = perfect critic, <= 0 = useless)."""
    if mask.sum() < 2:
        return torch.zeros(())
    var = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var.clamp(min=1e-8)


class PPO(OnlineRL):
    """Proximal Policy Optimization with a value head, a KL-penalised reward and GAE.

    Override :meth:`reward` (or set ``rewards``) to change what is optimised and :meth:`rollout` to change how
    responses are produced. Metrics: ``train/reward`` (mean reward), ``train/score`` (after the missing-EOS penalty
    and clipping, before the KL penalty), ``train/kl`` (mean per-token KL estimate), ``train/kl_sequence`` (mean
    over sequences of the summed per-token KL, what the adaptive controller steers), ``train/kl_coef``,
    ``train/entropy``, ``train/clipfrac``, ``train/approx_kl``, ``train/value_loss``, ``train/policy_loss``,
    ``train/explained_variance``, ``train/response_length``, ``train/stop_rate``, ``train/epochs``,
    ``train/rollout_tokens_per_sec`` and ``train/step_seconds``.

    ``trainer.max_steps`` counts optimiser updates (Lightning's convention for manual optimisation): each rollout
    makes ``epochs * ceil(rollout size / minibatch_size)`` of them, fewer when the epochs stop early.

    Args:
        kl: The KL block (:class:`rlft.methods.online.KLSettings`); PPO's default is ``{coef: 0.05, estimator: k1,
            placement: reward}``, ``target`` turns the adaptive controller on.
        epochs: Passes over each rollout.
        clip_range_value: Value clip epsilon.
        vf_coef: Weight of the value loss.
        gamma: Discount.
        lam: GAE lambda.
        whiten_rewards: Whiten the per-token rewards of each rollout (scale only, as TRL).
        reward_clip: Clip scores to ``[-reward_clip, reward_clip]`` before the KL penalty.
        critic: ``null`` puts the value head on the policy trunk; a model string trains a separate critic (with
            the policy's LoRA, quantization, gradient checkpointing and attention settings) instead.
        value_head: ``linear`` or ``mlp`` (hidden -> hidden -> 1, GELU): the scalar heads of the reward model
            (``rlft.models.reward.REWARD_HEADS``; a ``module:function`` of ``hidden_size`` works too), starting at 0.
    """

    default_kl = KLSettings(coef=0.05, estimator="k1", placement="reward")

    def __init__(
        self,
        model: str,
        epochs: int = 4,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_rewards: bool = False,
        reward_clip: float | None = None,
        critic: str | None = None,
        value_head: str = "linear",
        **kwargs,
    ) -> None:
        resolve(value_head, REWARD_HEADS, "value head")  # a typo fails here, not when the network is built
        super().__init__(model, epochs=epochs, **kwargs)
        self.critic = None
        self.value_head = None

    def on_model_built(self) -> None:
        super().on_model_built()
        hp = self.hparams
        if hp.critic is not None:
            # loaded as the policy is: a critic without the run's checkpointing or quantization would silently
            # hold its activations or full-precision weights
            self.critic = load_model(
                hp.critic,
                dtype=hp.dtype,
                lora=self.lora_settings,
                quantization=hp.quantization,
                gradient_checkpointing=hp.gradient_checkpointing,
                attn_implementation=hp.attn_implementation,
            )
            disable_dropout(self.critic)
        trunk = self.critic if self.critic is not None else self.model
        hidden = trunk.config.get_text_config().hidden_size
        # a head that predicts 0 at first, so early advantages are the plain rewards rather than noise
        self.value_head = resolve(hp.value_head, REWARD_HEADS, "value head")(hidden)

    @property
    def needs_hidden(self) -> bool:
        return self.critic is None  # the value head reads the policy's own trunk states

    # ------------------------------------------------------------------ hooks
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample responses for a prompts batch with old and reference log-probs and old values."""
        shared_trunk = self.critic is None
        # sharded weights gathered once for the whole rollout (sampling, old log-probs, values), not per step
        with full_weights(self):
            rollout = self.sample(batch, score=not shared_trunk)
            logps, values = [], []
            with inference(self):
                for part in rollout.split(self.hparams.micro_batch_size or len(rollout)):
                    if shared_trunk:
                        # one forward gives the old log-probs and the trunk states the value head reads
                        part_logps, _, hidden = token_logps(
                            self.model,
                            part.input_ids,
                            part.attention_mask,
                            part.response_ids.shape[1],
                            temperature=self.sampling.temperature,
                            with_hidden=True,
                            share_prompts=self.hparams.share_prompts,
                        )
                        logps.append(part_logps)
                        values.append(self.values(part, hidden))
                    else:
                        values.append(self.values(part))
            if shared_trunk:
                rollout.logps = torch.cat(logps)
            rollout.values = torch.cat(values)
        return rollout

    def values(self, rollout: Rollout, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Value estimates ``[N, R]`` of the states before each response token."""
        if hidden is None:
            trunk = self.critic if self.critic is not None else self.model
            length = rollout.response_ids.shape[1]
            _, _, hidden = token_logps(
                trunk,
                rollout.input_ids,
                rollout.attention_mask,
                length,
                with_hidden=True,
                with_logps=False,
                share_prompts=self.hparams.share_prompts,
            )
        return self.value_head(hidden.to(next(self.value_head.parameters()).dtype)).squeeze(-1)

    def shape_scores(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """The missing-EOS penalty (see :class:`OnlineRL`), then clipping to ``[-reward_clip, reward_clip]``."""
        scores = super().shape_scores(rollout, scores)
        if self.hparams.reward_clip is not None:
            scores = scores.clamp(-self.hparams.reward_clip, self.hparams.reward_clip)
        return scores

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """GAE advantages ``[N, R]`` (whitened over the global batch); the returns go to ``rollout.returns``."""
        hp = self.hparams
        rewards = self.token_rewards(rollout, scores)
        mask = rollout.response_mask.to(rewards.dtype)
        if hp.whiten_rewards and self.sum_over_processes(mask.sum()) > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=self.sum_over_processes) * mask
        # a multi-turn trajectory: the environment's tokens between the model's turns are not time steps
        gaps = rollout.env_mask is not None
        advantages, rollout.returns = gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam, skip_gaps=gaps)
        if self.sum_over_processes(mask.sum()) > 1:
            # the global batch's statistics, so N processes compute what one process would on the same batch
            advantages = masked_whiten(advantages, mask, all_reduce=self.sum_over_processes) * mask
        return advantages

    def auxiliary_loss(self, batch: Rollout, scored: ScoredTokens) -> LossOutput:
        """``vf_coef`` times the clipped value loss (:func:`rlft.rl_losses.ppo_value_loss`), aggregated as the
        policy loss is."""
        hp = self.hparams
        values = self.values(batch, scored.hidden)
        out = ppo_value_loss(
            values,
            batch.values,
            batch.returns,
            batch.response_mask,
            clip_range_value=hp.clip_range_value,
            loss_aggregation=hp.loss_aggregation,
            max_new_tokens=self.sampling.max_new_tokens,
        )
        return LossOutput(hp.vf_coef * out.losses, {"value_loss": out.losses.detach(), **out.stats})

    def rollout_metrics(self, rollout: Rollout, started: float) -> dict[str, torch.Tensor]:
        mask = rollout.response_mask.to(rollout.returns.dtype)
        return {
            **super().rollout_metrics(rollout, started),
            "explained_variance": explained_variance(rollout.values, rollout.returns, mask),
        }

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.critic is not None:
            self.critic.train()
