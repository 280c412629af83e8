"""Supervised fine-tuning with a completion-only loss."""

from __future__ import annotations

import torch

from rlft.data.batches import SFTBatch
from rlft.logprobs import IGNORE_INDEX
from rlft.methods.base import RLFTModule
from rlft.models.attention import forward_inputs
from rlft.models.scoring import scored_logps


class SFT(RLFTModule):
    """Supervised fine-tuning: next-token NLL on assistant tokens only, token-weighted over the batch.

    Logs ``train/loss``, ``val/loss`` (token-weighted over the whole validation set) and ``val/perplexity``; both
    come from :meth:`compute_loss`, so an override of it changes validation too.
    """

    data_kind = "sft"

    def token_logps(self, batch: SFTBatch) -> torch.Tensor:
        """Log-probs of every trained (assistant) token of a padded or packed batch, ``[K]``.

        The LM head runs only on those tokens (never on prompts or padding), in chunks.
        """
        labels = batch.tokens.labels
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        source = rows * labels.shape[1] + cols
        return scored_logps(self.model, forward_inputs(self.model, batch.tokens), source, labels[rows, cols + 1])

    def compute_loss(self, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token-weighted NLL over the *global* batch.

        Under data parallelism each rank divides its NLL sum by the token count of all ranks (times the world size,
        which the gradient averaging divides out again), so N processes compute exactly the gradient of one
        process with the N-times larger batch rather than an average of per-rank means.
        """
        logps = self.token_logps(batch)
        nll = -logps.sum()
        tokens = torch.tensor(logps.numel(), device=logps.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and self.training:
            global_tokens = self.trainer.strategy.reduce(tokens.detach().float(), reduce_op="sum")
            loss = nll * world / global_tokens.clamp(min=1)
            global_loss = self.trainer.strategy.reduce(nll.detach(), reduce_op="sum") / global_tokens.clamp(min=1)
            return loss, {"trained_tokens": tokens.float(), "global_loss": global_loss}
        loss = nll / tokens.clamp(min=1)
        return loss, {"trained_tokens": tokens.float(), "global_loss": loss.detach()}

    def validation_epoch_metrics(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss``: each batch's :meth:`compute_loss` weighted by its trained tokens, which is the NLL per token of
        the whole set (not a mean of batch means); ``perplexity``: its exponential."""
        # a compute_loss override that reports no token count is weighted by examples
        weights = pooled.get("trained_tokens", pooled["batch_size"])
        loss = (pooled["loss"] * weights).sum() / weights.sum().clamp(min=1)
        return {"loss": loss, "perplexity": loss.exp()}
