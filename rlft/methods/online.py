"""The online-RL core that PPO, GRPO and REINFORCE++ share: sample, score, shape, estimate, update, validate.

The core owns the loop; a method implements only its own math. One training step::

    rollout = self.rollout(batch)                         # sample (+ old / reference log-probs, values)
    rollout.rewards = self.reward(prompts, completions, **fields)     # [N], optionally with named metrics
    rollout.scores = self.shape_scores(rollout, rollout.rewards)      # e.g. DAPO's overlong penalty
    rollout.advantages = self.advantages(rollout, rollout.scores)     # [N] or [N, R] -> stored as [N, R]
    for epoch, minibatch (and micro-batch) of the rollout:            # `epochs`, `minibatch_size`, `micro_batch_size`
        out = self.policy_loss(minibatch, logps, minibatch.advantages)   # LossOutput: per-sequence losses + stats
        out += kl.coef * KL term (kl.placement: loss) + self.auxiliary_loss(minibatch, scored)  # PPO's value loss
        backward; after the last micro-batch: clip, step, schedule
    stop the epochs early once the approx-KL to the rollout policy passes `target_approx_kl`

Every hook has one signature for every online method (see each method's docstring): ``rollout``, ``reward``
(``fields`` carry the record fields, ``completion_ids``, ``completion_lengths``, ``step`` and ``stage``),
``shape_scores``, ``advantages``, ``policy_loss`` (its ``batch`` is a minibatch :class:`Rollout` with ``row_ids``,
``group_ids``, old and reference log-probs, masks, rewards and every per-prompt field) and ``auxiliary_loss``.

The KL to the reference is one settings block, ``kl``, for every method: in the reward (PPO, REINFORCE++: a
per-token penalty) or in the loss (GRPO: a per-token term). Validation runs the same hooks and the same loss on
held-out prompts. ``training_step`` returns ``{"rollout": rollout}``, which Lightning hands to every callback's
``on_train_batch_end`` as ``outputs``. The update loop itself (epochs x minibatches x micro-batches, the approx-KL stop,
the adaptive KL) is :class:`rlft.methods.online_update.MinibatchUpdates`, mixed in here.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import ClassVar

import torch

from rlft.data.batches import PromptBatch
from rlft.generation.settings import ONLINE_SAMPLING, DecoderSettings, SamplingSettings, sampling_settings
from rlft.methods.base import RLFTModule
from rlft.methods.online_update import MinibatchUpdates, ScoredTokens
from rlft.models.memory import return_freed_memory
from rlft.models.modes import disable_dropout
from rlft.models.reference import build_reference
from rlft.ops import kl_estimate, last_token_scores, masked_mean
from rlft.outputs import LossOutput
from rlft.registry import resolve
from rlft.rl.kl import KLSettings
from rlft.rl.multiturn import AgentSettings, agent_metrics, collect_agent_rollout
from rlft.rl.rewards import Rewards, RewardSpec, as_reward_tensor, reward_fields, total_reward
from rlft.rl.rollout import Rollout, collect_rollout
from rlft.rl_losses import LOSS_AGGREGATIONS, ppo_policy_loss
from rlft.strategies import full_weights


class OnlineRL(MinibatchUpdates, RLFTModule):
    """Base of the online methods (see the module docs for the loop and its hooks).

    Args:
        rewards: Reward sources summed with their weights (see :mod:`rlft.rl.rewards`).
        sampling: What is sampled (:class:`~rlft.generation.settings.SamplingSettings`); unset fields take
            ``ONLINE_SAMPLING`` (temperature 1.0, 64 tokens, no top-k).
        decoder: How rollouts are decoded (:class:`~rlft.generation.settings.DecoderSettings`).
        share_prompts: Score rollouts and run the updates with each prompt once for all of its samples, no padding
            (:mod:`rlft.rl.layout`; same log-probs up to rounding); needs segmented attention (SDPA models).
        kl: The KL to the reference (:class:`KLSettings`); unset fields take the method's defaults.
        epochs: Passes over each rollout (PPO's epochs, GRPO's mu); > 1 makes the ratio and clipping matter.
        minibatch_size: Sequences per optimiser step; default the whole rollout.
        micro_batch_size: Sequences per forward/backward inside a minibatch (gradient accumulation: the same
            update as the whole minibatch, in bounded memory), and per scoring forward of the rollout; with
            ``decoder.batch_size`` the memory stays flat as the rollout grows. Default: all at once.
        clip_range: Ratio clip epsilon of the surrogate.
        loss_aggregation: How token losses become one value per sequence: ``token`` (a token mean over the global
            minibatch), ``sequence`` or ``dr_grpo`` (see ``rlft.rl_losses.LOSS_AGGREGATIONS``).
        target_approx_kl: Stop a rollout's epochs early once an epoch's mean approx-KL to the rollout policy passes
            this.
        missing_eos_penalty: Subtract this from the score of responses cut at ``max_new_tokens`` (so a length reward
            cannot be met by a response that never ends).
        ref_model: Model string of a frozen reference (as DPO's ``ref_model``); default the initial policy without a
            second copy of the base: the LoRA base with the adapter disabled, or, when ``model`` continues an adapter
            folder (e.g. an SFT result), a frozen copy of that adapter; a frozen copy of the policy when training
            all weights.
        max_grad_norm: Gradient clipping norm (``null`` disables).
        agent: Multi-turn, tool-using rollouts (:class:`~rlft.rl.multiturn.AgentSettings`: ``tools`` or an
            ``environment``, ``max_turns``, a token budget); the environment's reward is added to ``rewards`` (or is
            the reward when no ``rewards`` are set). Default: one sampled reply per row.
    """

    data_kind = "prompts"
    default_lr = 1e-5
    #: the method's KL defaults (``kl`` fields left unset take these)
    default_kl: ClassVar[KLSettings] = KLSettings(coef=0.05, estimator="k1", placement="reward")
    #: return the heap the last step freed to the OS before each step (measured on SmolLM2 GRPO, 2-core CPU: peak
    #: RSS 2.41 -> 2.22 GB for ~4 % longer steps, as the next step faults its pages back in)
    trim_heap_each_step: ClassVar[bool] = True
    supports_packed_batches = False  # prompts are sampled from, never packed

    def __init__(
        self,
        model: str,
        rewards: list[RewardSpec] | None = None,
        sampling: SamplingSettings = ONLINE_SAMPLING,
        decoder: DecoderSettings = DecoderSettings(),
        share_prompts: bool = True,
        kl: KLSettings = KLSettings(),
        epochs: int = 1,
        minibatch_size: int | None = None,
        micro_batch_size: int | None = None,
        clip_range: float = 0.2,
        loss_aggregation: str = "token",
        target_approx_kl: float | None = None,
        missing_eos_penalty: float | None = None,
        ref_model: str | None = None,
        max_grad_norm: float | None = 1.0,
        agent: AgentSettings | None = None,
        **kwargs,
    ) -> None:
        resolve(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")  # a typo fails here, not at step 1
        for name, value in (
            ("epochs", epochs),
            ("minibatch_size", minibatch_size),
            ("micro_batch_size", micro_batch_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(model, **kwargs)
        self.automatic_optimization = False
        self.sampling = sampling_settings(sampling, ONLINE_SAMPLING, online=True)
        self.decoder = DecoderSettings(**decoder) if isinstance(decoder, dict) else decoder
        kl = KLSettings(**kl) if isinstance(kl, dict) else kl
        self.kl_settings = kl.with_defaults(self.default_kl)
        self.hparams["kl"] = asdict(self.kl_settings)  # what ran, the method's defaults resolved
        self.kl_coef = self.kl_settings.coef
        self.rewards = Rewards(rewards) if rewards else None
        self.agent = AgentSettings(**agent) if isinstance(agent, dict) else agent
        self.reference_model = None

    def on_model_built(self) -> None:
        super().on_model_built()
        if self.agent is not None:
            self.agent.factory(self.tokenizer)  # a bad tool or environment fails at start, not at the first rollout
        # log-prob ratios must compare the same network at rollout and update time
        disable_dropout(self.model)
        if self.needs_reference:
            self.reference_model = build_reference(
                self.model, self.hparams.model, self.hparams.ref_model, dtype=self.hparams.dtype
            )

    # ------------------------------------------------------------------ hooks
    @property
    def samples_per_prompt(self) -> int:
        """Responses sampled per prompt (rows of one prompt share a ``group_id``)."""
        return 1

    @property
    def needs_reference(self) -> bool:
        """Whether rollouts carry reference log-probs (``ref_logps``): when the KL is on; a subclass whose loss
        reads the reference itself (e.g. DPO on pairs of a group) returns True."""
        return self.kl_settings.coef != 0

    @property
    def needs_hidden(self) -> bool:
        """Whether the update's forward must also return the trunk states (a value head on the policy)."""
        return False

    def sample(self, batch: PromptBatch, *, score: bool | None = None) -> Rollout:
        """Sample ``samples_per_prompt`` responses per prompt with the log-probs the update needs: old ones when the
        policy moves before the rollout's last update or the KL is in the reward, reference ones when ``kl.coef``
        is not 0."""
        if score is None:
            rows = len(batch) * self.samples_per_prompt
            several_updates = self.hparams.epochs > 1 or (self.hparams.minibatch_size or rows) < rows
            score = several_updates or (self.kl_coef != 0 and self.kl_settings.placement == "reward")
        options = dict(
            group_size=self.samples_per_prompt,
            score=score,
            reference=self.reference_model,
            with_reference=self.needs_reference,
            score_batch_size=self.hparams.micro_batch_size,
            share_prompts=self.hparams.share_prompts,
        )
        with full_weights(self):  # sharded weights gathered once per rollout, not per decoding step
            if self.agent is not None:
                return collect_agent_rollout(
                    self.model, self.tokenizer, batch, self.sampling, self.decoder, self.agent, **options
                )
            return collect_rollout(self.model, self.tokenizer, batch, self.sampling, self.decoder, **options)

    def rollout(self, batch: PromptBatch) -> Rollout:
        """What is sampled for a prompts batch (override for another layout or extra per-row tensors)."""
        return self.sample(batch)

    def reward(self, prompts: list, completions: list[str], **fields):
        """Score of each completion (``[N]``), optionally with named metrics to log: ``([N], {name: value})``.

        The default sums the configured ``rewards`` and, in a multi-turn rollout, the environment's reward
        (``env_reward``). ``fields`` holds the prompt records' extra fields plus ``completion_ids`` (token ids of the
        model's tokens, stop tokens included), ``completion_lengths``, ``step`` (the global step) and ``stage``
        (``"train"`` or ``"validate"``); a multi-turn rollout adds ``conversation``, ``turns``, ``tool_calls``,
        ``invalid_tool_calls`` and ``env_reward``.
        """
        result = total_reward(self.rewards, prompts, completions, fields)  # shared with `rlft eval agent`
        if result is None:
            raise ValueError(f"{type(self).__name__} has no reward: set `rewards` in the config or override reward()")
        return result

    def shape_scores(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Scores the advantages are computed from; the default subtracts ``missing_eos_penalty`` from responses
        cut at ``max_new_tokens`` (so a length reward cannot be met by a response that never ends)."""
        penalty = self.hparams.get("missing_eos_penalty")
        if penalty is not None:
            scores = scores - penalty * (~rollout.finished).to(scores.dtype)
        return scores

    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """The estimator: ``[N]`` sequence or ``[N, R]`` token advantages of the (shaped) scores."""
        raise NotImplementedError

    def policy_loss(self, batch: Rollout, logps: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
        """Per-sequence losses of one minibatch (``batch``: the rollout's rows, old log-probs in ``batch.logps``;
        ``logps``: ``[n, R]`` current log-probs with grad; ``advantages``: ``[n, R]``). The default is PPO's
        clipped surrogate (:func:`rlft.rl_losses.ppo_policy_loss`)."""
        return ppo_policy_loss(
            logps,
            batch.logps,
            advantages,
            batch.response_mask,
            clip_range=self.hparams.clip_range,
            loss_aggregation=self.hparams.loss_aggregation,
            max_new_tokens=self.sampling.max_new_tokens,
        )

    def auxiliary_loss(self, batch: Rollout, scored: ScoredTokens) -> LossOutput | None:
        """A loss added to the policy loss of each minibatch (PPO's value loss); none by default."""
        return None

    # ------------------------------------------------------------------ shared pieces
    def score(self, rollout: Rollout, stage: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Raw rewards ``[N]`` on the module's device and the reward's named metrics."""
        fields = reward_fields(rollout, step=self.global_step, stage=stage)
        result = self.reward(rollout.prompts, rollout.completions, **fields)
        values, metrics = result if isinstance(result, tuple) else (result, {})
        return as_reward_tensor(values, len(rollout)).to(self.device), metrics

    def rollout_kl(self, rollout: Rollout) -> torch.Tensor | None:
        """Per-token KL estimate ``[N, R]`` of the rollout policy to the reference (None without a reference)."""
        if rollout.kl is None and rollout.ref_logps is not None and rollout.logps is not None:
            mask = rollout.response_mask.to(rollout.logps.dtype)
            rollout.kl = kl_estimate(rollout.logps, rollout.ref_logps, kind=self.kl_settings.estimator) * mask
        return rollout.kl

    def token_rewards(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """``[N, R]`` per-token rewards: the score on the last response token, minus ``kl.coef * KL_t`` on every
        token when the KL is in the reward."""
        mask = rollout.response_mask.to(scores.dtype)
        rewards = last_token_scores(scores, mask)
        kl = self.rollout_kl(rollout) if self.kl_settings.placement == "reward" else None
        if kl is not None:
            rewards = rewards - self.kl_coef * kl
        return rewards

    def prepare(self, batch: PromptBatch, stage: str) -> Rollout:
        """Sample, score, shape and estimate: the rollout with ``rewards``, ``scores`` and ``advantages`` set."""
        rollout = self.rollout(batch)
        rollout.rewards, rollout.metrics = self.score(rollout, stage)
        rollout.scores = self.shape_scores(rollout, rollout.rewards)
        advantages = self.advantages(rollout, rollout.scores)
        mask = rollout.response_mask.to(advantages.dtype)
        rollout.advantages = advantages[:, None] * mask if advantages.dim() == 1 else advantages
        return rollout

    def rollout_metrics(self, rollout: Rollout, started: float) -> dict[str, torch.Tensor]:
        """What every online method logs for a rollout (the update's statistics come on top)."""
        mask = rollout.response_mask
        metrics = {
            "score": rollout.scores.mean(),
            "response_length": rollout.response_lengths.float().mean(),
            "stop_rate": rollout.finished.float().mean(),
            "rollout_tokens_per_sec": torch.tensor(mask.sum().item() / max(rollout.generation_seconds, 1e-9)),
            "step_seconds": torch.tensor(time.perf_counter() - started),
            **{f"reward/{name}": torch.as_tensor(value).float().mean() for name, value in rollout.metrics.items()},
            **{f"agent/{name}": value for name, value in agent_metrics(rollout.fields).items()},
        }
        if self.samples_per_prompt > 1:
            metrics["reward_std"] = rollout.rewards.view(-1, self.samples_per_prompt).std(-1).mean()
        if rollout.kl is not None:  # the KL in the reward: measured at rollout time, the controller's input
            metrics["kl"] = masked_mean(rollout.kl, mask.to(rollout.kl.dtype))
            metrics["kl_sequence"] = rollout.kl.sum(-1).mean()
        return metrics

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict:
        started = time.perf_counter()
        rollout = self.prepare(batch, "train")
        stats = self.update(rollout)
        self.adapt_kl(rollout, stats)
        metrics = {**self.rollout_metrics(rollout, started), **stats, "kl_coef": torch.tensor(float(self.kl_coef))}
        self.log("train/reward", rollout.rewards.mean(), prog_bar=True)
        self.log_dict({f"train/{name}": torch.as_tensor(value).float() for name, value in metrics.items()})
        return {"rollout": rollout}  # to every callback's on_train_batch_end as `outputs`

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> dict:
        # the same hooks and the same loss as training, on held-out prompts
        rollout = self.prepare(batch, "validate")
        out = self.minibatch_loss(rollout)
        metrics = {
            "loss": out.loss,
            "reward": rollout.rewards.mean(),
            **out.metrics(),
            **self.rollout_metrics(rollout, time.perf_counter()),
        }
        for name in ("step_seconds", "rollout_tokens_per_sec"):  # timings of a no-grad pass mean nothing here
            metrics.pop(name, None)
        size = len(rollout)
        self.log("val/reward", metrics.pop("reward"), prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict(
            {f"val/{k}": torch.as_tensor(v).float() for k, v in metrics.items()}, batch_size=size, sync_dist=True
        )
        return {"rollout": rollout}

    def on_train_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps module modes: train mode is what turns
        # gradient checkpointing on in transformers (dropout is zeroed either way)
        self.model.train()

    def on_train_batch_start(self, batch: PromptBatch, batch_idx: int) -> None:
        # the last update's freed activations would otherwise stay resident, fragmented, under the rollout's
        # allocations and the next update's, raising the peak
        super().on_train_batch_start(batch, batch_idx)
        if self.trim_heap_each_step:
            return_freed_memory(collect_garbage=False)

    def on_train_batch_end(self, outputs, batch: PromptBatch, batch_idx: int) -> None:
        # prompt and response tokens of the whole rollout, not only the prompt tokens the base class would count
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0 and outputs and "rollout" in outputs:
            tokens = int(outputs["rollout"].attention_mask.sum())
            self.log("train/tokens_per_sec", tokens / elapsed, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rlft_kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # restores the sampling RNG: without it a resume samples anew
        self.kl_coef = checkpoint.get("rlft_kl_coef", self.kl_coef)
