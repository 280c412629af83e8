"""The online-RL core that PPO, GRPO and REINFORCE++ share: sample, score, shape, update, validate.

A method on this core implements only its own math — :meth:`rollout` (what to sample and which log-probs to
keep), :meth:`advantages` and :meth:`policy_loss` — and inherits everything else: the reward sum and its extra
inputs, score shaping, the optimiser step (manual optimisation: several updates per rollout), validation through
the same ``rollout``/``reward`` hooks as training, stats and throughput. This is the one sanctioned second level
of inheritance (see DESIGN.md): ``LightningModule -> RLFTModule -> OnlineRL -> PPO/GRPO/ReinforcePP``.

Hooks a research subclass overrides (each is one method)::

    rollout(batch) -> Rollout                      # what is sampled (e.g. a different group layout)
    reward(prompts, completions, **fields) -> [N]  # what is optimised; fields carry completion_ids, lengths, step
    shape_scores(rollout, scores) -> [N]           # e.g. DAPO's soft overlong punishment
    advantages(rollout, scores) -> ...             # the estimator
    policy_loss(logps, old_logps, advantages, mask, **extra) -> (per-sequence losses, stats)   # GSPO, CISPO ...
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from rlft.methods.base import RLFTModule
from rlft.models.memory import return_freed_memory
from rlft.models.modes import disable_dropout
from rlft.models.reference import build_reference
from rlft.rl.rewards import Rewards, RewardSpec, as_reward_tensor
from rlft.rl.rollout import Rollout, RolloutSettings


class OnlineRL(RLFTModule):
    """Base of the online methods: call :meth:`init_online` from ``__init__`` after ``super().__init__``."""

    data_kind = "prompts"
    #: return the heap the last step freed to the OS before each step (measured on SmolLM2 GRPO, 2-core CPU: peak
    #: RSS 2.41 -> 2.22 GB for ~4 % longer steps, as the next step faults its pages back in)
    trim_heap_each_step: ClassVar[bool] = True
    supports_packed_batches = False  # prompts are sampled from, never packed

    def init_online(
        self,
        rewards: list[RewardSpec] | None,
        sampling: RolloutSettings | dict,
        *,
        reference: str | None,
        use_reference: bool,
    ) -> None:
        self.automatic_optimization = False
        self.sampling = RolloutSettings(**sampling) if isinstance(sampling, dict) else sampling
        self.rewards = Rewards(rewards) if rewards else None
        self.last_reward_parts: dict[str, torch.Tensor] = {}
        self._reference = (reference, use_reference)
        self.reference_model = None

    def on_model_built(self) -> None:
        super().on_model_built()
        # log-prob ratios must compare the same network at rollout and update time
        disable_dropout(self.model)
        reference, use_reference = self._reference
        if use_reference:
            self.reference_model = build_reference(self.model, self.hparams.model, reference, dtype=self.hparams.dtype)

    # ------------------------------------------------------------------ hooks
    def rollout(self, batch: dict) -> Rollout:
        raise NotImplementedError

    def reward(self, prompts: list, completions: list[str], **fields) -> torch.Tensor:
        """Score of each completion (``[N]``); the default sums the configured ``rewards``.

        ``fields`` holds the prompt records' extra fields plus ``completion_ids`` (token ids of each completion,
        stop token included), ``completion_lengths`` and ``step`` (the global step), as TRL passes
        ``completion_ids`` and the trainer state.
        """
        if self.rewards is None:
            raise ValueError(f"{type(self).__name__} has no reward: set `rewards` in the config or override reward()")
        total, self.last_reward_parts = self.rewards(prompts, completions, fields)
        return total

    def shape_scores(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Scores the advantages are computed from; the default subtracts ``missing_eos_penalty`` from responses
        cut at ``max_new_tokens`` (so a length reward cannot be met by a response that never ends)."""
        penalty = self.hparams.get("missing_eos_penalty")
        if penalty is not None:
            scores = scores - penalty * (~rollout.finished).to(scores.dtype)
        return scores

    # ------------------------------------------------------------------ shared pieces
    def score(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw rewards, shaped scores)`` of a rollout, both ``[N]`` on the module's device."""
        lengths = rollout.response_lengths.tolist()
        fields = {
            **rollout.fields,
            "completion_ids": [ids[:n].tolist() for ids, n in zip(rollout.response_ids, lengths)],
            "completion_lengths": lengths,
            "step": self.global_step,
        }
        raw = as_reward_tensor(self.reward(rollout.prompts, rollout.completions, **fields), len(rollout))
        raw = raw.to(self.device)
        return raw, self.shape_scores(rollout, raw)

    def token_share(self, mask: torch.Tensor) -> torch.Tensor:
        """This rank's weight in a token mean over the *global* minibatch: ``local tokens * world / all tokens``.

        A rank's token-mean loss divides by its own token count, and data parallelism averages the ranks'
        gradients, so with ragged completions each rank's tokens would weigh ``1 / its count`` instead of
        ``1 / the global count``. A loss multiplied by this gives, averaged over ranks, the gradient one process
        computes on the whole minibatch (1 in one process; a collective otherwise: every rank calls it).
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return torch.ones((), device=mask.device)
        local = mask.sum().float()
        return local * self.trainer.world_size / self.sum_over_processes(local).clamp(min=1.0)

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all training processes (itself in one process)."""
        world = 1 if self._trainer is None else self.trainer.world_size
        return self.sum_over_processes(value) / world

    def optimizer_update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``: backward, clip to ``max_grad_norm``, step, schedule."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.get("max_grad_norm") is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:  # per optimiser step, as Lightning counts `max_steps` here
            scheduler.step()

    def rollout_metrics(self, rollout: Rollout, raw: torch.Tensor, shaped: torch.Tensor, started: float) -> dict:
        """The statistics every online method logs for a step."""
        mask = rollout.response_mask
        return {
            "score": shaped.mean(),
            "response_length": rollout.response_lengths.float().mean(),
            "stop_rate": rollout.finished.float().mean(),
            "rollout_tokens_per_sec": torch.tensor(mask.sum().item() / max(rollout.generation_seconds, 1e-9)),
            "step_seconds": torch.tensor(time.perf_counter() - started),
            **{f"reward/{k}": v.mean() for k, v in self.last_reward_parts.items()},
        }

    def log_step(self, rollout: Rollout, raw: torch.Tensor, metrics: dict) -> None:
        self._step_tokens = int(rollout.attention_mask.sum())
        self.log("train/reward", raw.mean(), prog_bar=True)
        self.log_dict({f"train/{k}": torch.as_tensor(v).float() for k, v in metrics.items()})

    # ------------------------------------------------------------------ Lightning hooks
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same hooks as training, so a subclass's rollout or reward is what validation measures too
        rollout = self.rollout(batch)
        raw, _ = self.score(rollout)
        size = len(rollout)
        self.log("val/reward", raw.mean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/response_length", rollout.response_lengths.float().mean(), batch_size=size, sync_dist=True)

    def on_train_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps module modes: train mode is what turns
        # gradient checkpointing on in transformers (dropout is zeroed either way)
        self.model.train()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # the last update's freed activations would otherwise stay resident, fragmented, under the rollout's
        # allocations and the next update's, raising the peak
        super().on_train_batch_start(batch, batch_idx)
        if self.trim_heap_each_step:
            return_freed_memory(collect_garbage=False)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # prompt and response tokens of the whole rollout, not only the prompt tokens the base class would count
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0:
            self.log("train/tokens_per_sec", getattr(self, "_step_tokens", 0) / elapsed, prog_bar=True)
