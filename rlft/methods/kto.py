"""Kahneman-Tversky Optimization: preference tuning from unpaired desirable / undesirable completions.

The data kind is ``unpaired`` (:mod:`rlft.data.kinds`): rows ``{"prompt", "completion", "label": true | false}``,
TRL's KTO format. The reference log-probs come from (``reference``), as in DPO:

* ``adapter`` — the LoRA base with the adapter switched off: no second copy of the weights (default with LoRA);
  continuing an existing adapter (e.g. an SFT output folder), a frozen copy of it named ``ref`` instead;
* ``model`` — a separate frozen model loaded from ``ref_model`` (any model string; default: ``model`` itself).

KTO's reference point (the KL term) is estimated per batch as TRL does: each prompt paired with the previous row's
completion (the collated ``kl_*`` rows), ``max(0, mean(policy - reference log-probs))``, detached and averaged over
data-parallel processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from rlft.data.batches import UnpairedBatch
from rlft.logprobs import IGNORE_INDEX
from rlft.methods.base import RLFTModule
from rlft.models import is_adapter
from rlft.models.modes import disable_dropout as zero_dropout
from rlft.models.reference import build_reference, load_reference_adapter, reference_model
from rlft.models.scoring import position_ids_from_mask, scored_logps, vocabulary_size
from rlft.models.unwrap import causal_lm
from rlft.outputs import LossOutput
from rlft.unpaired_losses import kto_kl, kto_loss


@dataclass
class UnpairedLogps:
    """Per-sequence log-probs of a batch of unpaired examples, summed over the completion tokens.

    Attributes:
        completion: ``[B]`` log-probs of each row's own completion.
        mismatched: ``[B]`` log-probs of the mismatched (prompt, other completion) rows of the KL estimate; detached.
        tokens: ``[B]`` completion tokens of each row.
    """

    completion: torch.Tensor
    mismatched: torch.Tensor
    tokens: torch.Tensor


def completion_logps(model: torch.nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B] summed log-probs, [B] token counts)`` of the labelled tokens of right-padded rows, in one forward.

    The LM head runs on the labelled positions only (:func:`rlft.models.scoring.scored_logps`), never on prompts.
    """
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    token_logps = scored_logps(model, inputs, rows * labels.shape[1] + cols, labels[rows, cols + 1])
    sums = torch.zeros(len(labels), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(len(labels), dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    return sums, counts


class KTO(RLFTModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

    Trains on single completions labelled desirable or undesirable instead of pairs: a desirable completion's
    implicit reward ``beta * log(policy / reference)`` is pushed above the reference point (the batch's KL estimate),
    an undesirable one's below it (:func:`rlft.unpaired_losses.kto_loss`). Logs ``{train,val}/rewards/{chosen,
    rejected}`` (mean implicit reward of the desirable / undesirable rows, when the batch has any),
    ``{train,val}/logps/{chosen,rejected}`` and ``{train,val}/kl``. To try another objective, override
    :meth:`unpaired_loss`.

    Args:
        beta: Inverse temperature of the implicit reward.
        desirable_weight: Weight of the desirable rows' losses (the paper's lambda_D).
        undesirable_weight: Weight of the undesirable rows' losses (lambda_U). With unbalanced data, choose the
            weights so that ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` is in
            [1, 4/3] (the paper's advice).
        reference: ``adapter`` (the LoRA base with the adapter off) or ``model`` (a separate frozen ``ref_model``);
            default ``adapter`` with LoRA, ``model`` without.
        ref_model: Model string of the reference for ``model``; default: ``model``.
        disable_dropout: Switch dropout off in the policy (and reference) so log-prob ratios are not noisy.

    A per-row ``weight`` field of the data weights each row's loss in the batch mean.
    """

    default_lr = 5e-6
    data_kind = "unpaired"
    uses_fields = frozenset({"weight"})
    supports_packed_batches = False  # the KL rows pair each prompt with another row's completion, in padded rows

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: Literal["adapter", "model"] | None = None,
        ref_model: str | None = None,
        disable_dropout: bool = True,
        **kwargs,
    ) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight} and {undesirable_weight}"
            )
        super().__init__(model, **kwargs)
        is_peft = self.lora_settings is not None or is_adapter(model)  # known before the network is built
        self.reference_mode = reference or ("adapter" if is_peft else "model")
        if self.reference_mode not in ("adapter", "model"):
            raise ValueError(f"reference must be 'adapter' or 'model', got {reference!r}")
        if self.reference_mode == "adapter" and not is_peft:
            raise ValueError("reference: adapter needs a LoRA policy (set `lora`), or use reference: model")
        self.ref_model: torch.nn.Module | None = None

    def on_model_built(self) -> None:
        super().on_model_built()
        if self.reference_mode == "model":
            self.ref_model = self.load_reference_model()
        elif hasattr(self.model, "disable_adapter"):
            load_reference_adapter(self.model, self.hparams.model)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(getattr(datamodule, "hparams", None), "batch_size", None)
        if stage == "fit" and batch_size is not None and batch_size < 2:
            # one row has no other row's completion to pair its prompt with: the KL point would be its own reward
            raise ValueError(
                f"KTO needs data.batch_size >= 2 (got {batch_size}): the KL reference point pairs each "
                "prompt with another row's completion of the same batch"
            )

    # ------------------------------------------------------------------------------------------ reference
    def load_reference_model(self) -> torch.nn.Module:
        """The frozen separate reference (``reference: model``); it must share the policy's vocabulary."""
        hp = self.hparams
        ref = build_reference(self.model, hp.model, hp.ref_model or hp.model, dtype=hp.dtype)
        zero_dropout(ref)
        policy_vocab, ref_vocab = vocabulary_size(causal_lm(self.model)), vocabulary_size(causal_lm(ref))
        if ref_vocab != policy_vocab:
            raise ValueError(
                f"ref_model {hp.ref_model!r} has a vocabulary of {ref_vocab} tokens but the policy has "
                f"{policy_vocab}; the reference must share the policy's tokenizer"
            )
        return ref

    @contextlib.contextmanager
    def reference_network(self) -> Iterator[torch.nn.Module]:
        """The network that plays the reference, ready to run under ``torch.no_grad``."""
        if self.ref_model is not None:
            self.ref_model.eval()  # Lightning's .train() reaches it as a submodule
        with reference_model(self.model, self.ref_model) as network:
            yield network

    # ------------------------------------------------------------------------------------------ log-probs
    def policy_logps(self, batch: UnpairedBatch) -> UnpairedLogps:
        """The policy's log-probs: with grad for the completions, without for the KL rows (only their mean is used,
        detached, so they need no activations kept)."""
        rows, kl_rows = batch.tokens, batch.kl_tokens
        completion, tokens = completion_logps(self.model, rows.input_ids, rows.attention_mask, rows.labels)
        with torch.no_grad():
            mismatched, _ = completion_logps(self.model, kl_rows.input_ids, kl_rows.attention_mask, kl_rows.labels)
        return UnpairedLogps(completion, mismatched, tokens)

    def reference_logps(self, batch: UnpairedBatch) -> UnpairedLogps:
        """The reference's log-probs of the completions and the KL rows, in one forward (both are padded to one
        width by the collator)."""
        n, rows, kl_rows = len(batch), batch.tokens, batch.kl_tokens
        with torch.no_grad(), self.reference_network() as network:
            logps, tokens = completion_logps(
                network,
                *(
                    torch.cat([getattr(rows, key), getattr(kl_rows, key)])
                    for key in ("input_ids", "attention_mask", "labels")
                ),
            )
        return UnpairedLogps(logps[:n], logps[n:], tokens[:n])

    # ------------------------------------------------------------------------------------------ loss
    def kl_reference_point(self, policy: UnpairedLogps, reference: UnpairedLogps) -> torch.Tensor:
        """The detached batch KL estimate (``>= 0``), averaged over data-parallel processes before the clamp."""
        world = self.trainer.world_size if self._trainer is not None else 1
        average = (lambda kl: self.sum_over_processes(kl) / world) if world > 1 else None
        return kto_kl(policy.mismatched, reference.mismatched, all_reduce_mean=average)

    def unpaired_loss(
        self, policy: UnpairedLogps, reference: UnpairedLogps, kl: torch.Tensor, batch: UnpairedBatch
    ) -> LossOutput:
        """Per-example losses and stats (``rewards`` at least, ``[B]``); override to try another objective."""
        hp = self.hparams
        return kto_loss(
            policy.completion,
            reference.completion,
            batch.label,
            kl,
            beta=hp.beta,
            desirable_weight=hp.desirable_weight,
            undesirable_weight=hp.undesirable_weight,
        )

    def compute_loss(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_logps(batch)
        reference = self.reference_logps(batch)
        kl = self.kl_reference_point(policy, reference)
        output = self.unpaired_loss(policy, reference, kl, batch)
        return self.reduce_losses(output.losses, batch), unpaired_metrics(
            policy, output.stats["rewards"], batch.label, kl
        )


def unpaired_metrics(policy: UnpairedLogps, rewards: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor) -> dict:
    """The logged statistics (names without the ``train/``/``val/`` prefix); a side absent from the batch is not
    logged for it, rather than logged as NaN."""
    metrics = {"kl": kl.detach().float()}
    for side, rows in (("chosen", labels), ("rejected", ~labels)):
        if rows.any():
            metrics[f"rewards/{side}"] = rewards[rows].detach().float().mean()
            metrics[f"logps/{side}"] = policy.completion[rows].detach().float().mean()
    return metrics
