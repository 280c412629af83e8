"""The update half of the online core (:class:`rlft.methods.online.OnlineRL`): ``epochs`` passes of shuffled
minibatches over one rollout, each minibatch one optimiser step accumulated over micro-batches, the loss from the
method's hooks (``policy_loss``, the KL term, ``auxiliary_loss``), early stopping on the approx-KL, and the adaptive
KL controller. Every decision that changes the number of collectives (the early stop, the KL coefficient) is taken on
values reduced over all ranks, so data-parallel processes never diverge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlft.ops import kl_estimate, masked_mean
from rlft.outputs import LossOutput
from rlft.rl.logps import token_logps
from rlft.rl.rollout import Rollout, minibatches
from rlft.rl_losses import aggregate_tokens


@dataclass
class ScoredTokens:
    """What the update's forward over a minibatch gives: log-probs (with grad), entropy, trunk states."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class MinibatchUpdates:
    """The update loop of :class:`~rlft.methods.online.OnlineRL` (which mixes it in, with the hooks it calls)."""

    def score_tokens(self, batch: Rollout) -> ScoredTokens:
        """The update's forward over a minibatch: log-probs with grad, entropy and (``needs_hidden``) states."""
        logps, entropy, hidden = token_logps(
            self.model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_ids.shape[1],
            temperature=self.sampling.temperature,
            with_entropy=True,
            with_hidden=self.needs_hidden,
            share_prompts=self.hparams.share_prompts,
        )
        return ScoredTokens(logps, entropy, hidden)

    def minibatch_loss(self, batch: Rollout) -> LossOutput:
        """The loss of one minibatch: policy loss, the KL term (``kl.placement: loss``) and the auxiliary loss."""
        scored = self.score_tokens(batch)
        if batch.logps is None:  # one update per rollout: the rollout policy is the current one, the ratio is 1
            batch = replace(batch, logps=scored.logps.detach())
        out = self.policy_loss(batch, scored.logps, batch.advantages)
        out = out if isinstance(out, LossOutput) else LossOutput(*out)  # a `(losses, stats)` pair reads the same
        mask = batch.response_mask.to(scored.logps.dtype)
        out.stats["policy_loss"] = out.losses.detach()
        if self.kl_settings.placement == "loss" and self.kl_coef != 0:
            token_kl = kl_estimate(scored.logps, batch.ref_logps, kind=self.kl_settings.estimator)
            kl = aggregate_tokens(token_kl, mask, self.hparams.loss_aggregation, self.sampling.max_new_tokens)
            out = out.plus(LossOutput(kl, {"kl": masked_mean(token_kl.detach(), mask, dim=-1)}), self.kl_coef)
        auxiliary = self.auxiliary_loss(batch, scored)
        if auxiliary is not None:
            out = out.plus(auxiliary)
        out.stats["entropy"] = masked_mean(scored.entropy, mask, dim=-1)
        out.stats["approx_kl"] = masked_mean(0.5 * (scored.logps.detach() - batch.logps) ** 2, mask, dim=-1)
        return out

    def update_minibatch(self, batch: Rollout) -> dict[str, torch.Tensor]:
        """One optimiser step on a minibatch, accumulated over micro-batches; returns its mean statistics."""
        token_mean = self.hparams.loss_aggregation == "token"
        mask = batch.response_mask.float()
        # a token mean over the *global* minibatch: each rank's share of its tokens (data parallelism then averages)
        world = 1 if self._trainer is None else self.trainer.world_size
        tokens = self.sum_over_processes(mask.sum()).clamp(min=1.0) if token_mean else None
        optimizer = self.optimizers()
        optimizer.zero_grad()
        total, rows = torch.zeros((), device=mask.device), {}
        for part in batch.split(self.hparams.micro_batch_size or len(batch)):
            out = self.minibatch_loss(part)
            share = part.response_mask.sum() * world / tokens if token_mean else len(part) / len(batch)
            loss = out.loss * share
            self.manual_backward(loss)
            total += loss.detach()
            for name, value in out.stats.items():
                value = value.detach().float()
                rows.setdefault(name, []).append(value.expand(len(part)) if value.dim() == 0 else value)
        self.apply_gradients()
        stats = {name: torch.cat(values).mean() for name, values in rows.items()}
        stats["loss"] = self.sum_over_processes(total) / world
        return stats

    def apply_gradients(self) -> None:
        """Clip to ``max_grad_norm``, step the optimiser and the schedule (per optimiser step, as Lightning counts
        ``max_steps`` here)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if self.hparams.get("max_grad_norm") is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``epochs`` passes over shuffled minibatches of one rollout; returns the means of the statistics."""
        hp = self.hparams
        totals: dict[str, list[torch.Tensor]] = {}
        epochs_done = 0
        for _ in range(hp.epochs):
            epoch_kl = []
            for rows in minibatches(len(rollout), hp.minibatch_size):
                stats = self.update_minibatch(rollout.select(rows.to(self.device)))
                for name, value in stats.items():
                    totals.setdefault(name, []).append(value)
                epoch_kl.append(stats["approx_kl"])
            epochs_done += 1
            # the stop decision is taken on the mean over ranks: a rank stopping alone would hang the others
            if hp.target_approx_kl is not None:
                world = 1 if self._trainer is None else self.trainer.world_size
                if self.sum_over_processes(torch.stack(epoch_kl).mean()) / world > hp.target_approx_kl:
                    break
        means = {name: torch.stack(values).mean() for name, values in totals.items()}
        means["epochs"] = torch.tensor(float(epochs_done))
        return means

    def adapt_kl(self, rollout: Rollout, stats: dict[str, torch.Tensor]) -> None:
        """Adaptive KL controller: every rank moves ``kl_coef`` by the same, global, per-sequence KL."""
        if self.kl_settings.target is None or self.kl_coef == 0:
            return
        sequences = self.sum_over_processes(torch.tensor(float(len(rollout)), device=self.device))
        if rollout.kl is not None:
            observed = self.sum_over_processes(rollout.kl.sum()) / sequences
        else:  # KL in the loss: the update's per-token KL times the mean response length
            world = 1 if self._trainer is None else self.trainer.world_size
            observed = self.sum_over_processes(stats["kl"] * rollout.response_lengths.float().mean()) / world
        self.kl_coef = self.kl_settings.update(self.kl_coef, float(observed), int(sequences))
