"""Direct Preference Optimization with three interchangeable reference models.

The policy scores chosen and rejected responses in **one** concatenated forward (:func:`pair_logps`). The reference
log-probs come from (``reference``):

* ``adapter`` — the LoRA base with the adapter switched off: no second copy of the weights (default with LoRA).
  When training continues an existing adapter (e.g. an SFT output folder), a frozen copy of that adapter is loaded
  under the name ``ref`` and activated instead, so the reference is the SFT policy, not the raw base;
* ``model`` — a separate frozen model loaded from ``ref_model`` (any model string; default: ``model`` itself);
* ``precomputed`` — computed once at fit start and kept in ``reference_logps.pt`` next to the checkpoints
  (:mod:`rlft.methods.precomputed`), so resumed runs and later epochs reuse it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch

from rlft.data.batches import PairBatch
from rlft.losses import DPO_LOSS_TYPES, dpo_loss
from rlft.methods.base import RLFTModule
from rlft.methods.precomputed import PrecomputedReference
from rlft.models import is_adapter, load_model
from rlft.models.lowp import full_precision_linears
from rlft.models.modes import disable_dropout as zero_dropout
from rlft.models.reference import load_reference_adapter, reference_model
from rlft.models.scoring import PairLogps, pair_logps, pair_metrics, vocabulary_size
from rlft.models.unwrap import causal_lm
from rlft.outputs import LossOutput
from rlft.registry import resolve

log = logging.getLogger(__name__)


def preference_metrics(logps: PairLogps, output: LossOutput) -> dict[str, torch.Tensor]:
    """The shared preference metrics (:func:`pair_metrics`) from a preference hook's output, plus every other
    statistic it returned (as its mean)."""
    stats = dict(output.stats)
    metrics = pair_metrics(logps, stats.pop("chosen_rewards"), stats.pop("rejected_rewards"))
    return metrics | LossOutput(output.losses, stats).metrics()


# ------------------------------------------------------------------------------------------------------ method
class DPO(RLFTModule):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290) and its loss variants.

    Logs ``{train,val}/rewards/{chosen,rejected,accuracy,margin}`` and ``{train,val}/logps/{chosen,rejected}``.
    To try a new objective, override :meth:`preference_loss` or register a function in
    ``rlft.losses.DPO_LOSS_TYPES`` and select it with ``loss_type``. A per-row ``weight`` of the pairs weights each
    pair's loss in the batch mean.

    Args:
        beta: Inverse temperature of the implicit reward (IPO's tau for ``loss_type: ipo``).
        loss_type: Key of ``rlft.losses.DPO_LOSS_TYPES`` (``sigmoid``, ``hinge``, ``ipo``, ``robust``) or your own
            ``module:function`` with the same signature (set ``function.length_averaged = True`` if it compares
            length-averaged log-probs).
        label_smoothing: Assumed label-flip rate (conservative DPO with ``sigmoid``, robust DPO).
        rpo_alpha: Weight of RPO's NLL term on the chosen responses; null disables it.
        reference: ``adapter``, ``model`` or ``precomputed`` (see the module docs); default ``adapter`` with LoRA,
            ``model`` without.
        ref_model: Model string of the reference for ``model``/``precomputed``; default: ``model``.
        ref_cache_path: File of precomputed reference log-probs; default ``<checkpoint dir>/reference_logps.pt``.
        disable_dropout: Switch dropout off in the policy (and reference) so log-prob ratios are not noisy.
        share_prompts: Run each pair's common prompt once for both responses (exact: the same log-probs; about a
            third fewer tokens through the network on HH-RLHF). Needs an SDPA model; others ignore it.
    """

    default_lr = 5e-6
    data_kind = "pairs"
    uses_fields = frozenset({"weight"})

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        reference: Literal["adapter", "model", "precomputed"] | None = None,
        ref_model: str | None = None,
        ref_cache_path: str | None = None,
        disable_dropout: bool = True,
        share_prompts: bool = True,
        **kwargs,
    ) -> None:
        resolve(loss_type, DPO_LOSS_TYPES, "loss_type")  # a typo fails here, not at the first step
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        super().__init__(model, **kwargs)
        is_peft = self.lora_settings is not None or is_adapter(model)  # known before the network is built
        self.reference_mode = reference or ("adapter" if is_peft else "model")
        if self.reference_mode not in ("adapter", "model", "precomputed"):
            raise ValueError(f"reference must be 'adapter', 'model' or 'precomputed', got {reference!r}")
        if self.reference_mode == "adapter" and not is_peft:
            raise ValueError("reference: adapter needs a LoRA policy (set `lora`), or use reference: model")
        self.ref_model: torch.nn.Module | None = None
        self.precomputed = PrecomputedReference(self)

    def on_model_built(self) -> None:
        super().on_model_built()
        hp = self.hparams
        if self.reference_mode == "model":
            self.ref_model = self.load_reference_model()
        if hasattr(self.model, "disable_adapter") and not (self.reference_mode == "precomputed" and hp.ref_model):
            load_reference_adapter(self.model, hp.model)

    # ------------------------------------------------------------------------------------------ reference sources
    def load_reference_model(self) -> torch.nn.Module:
        hp = self.hparams
        ref = load_model(hp.ref_model or hp.model, dtype=hp.dtype, lora=None, trainable_adapter=False)
        ref.requires_grad_(False).eval()
        zero_dropout(ref)
        policy_vocab, ref_vocab = vocabulary_size(causal_lm(self.model)), vocabulary_size(causal_lm(ref))
        if ref_vocab != policy_vocab:
            raise ValueError(
                f"ref_model {hp.ref_model!r} has a vocabulary of {ref_vocab} tokens but the policy has {policy_vocab}; "
                "the reference must share the policy's tokenizer"
            )
        return ref

    @contextlib.contextmanager
    def reference_network(self) -> Iterator[torch.nn.Module]:
        """The network that plays the reference, ready to run under ``torch.no_grad``."""
        if self.ref_model is not None:
            self.ref_model.eval()
            yield self.ref_model
        elif hasattr(self.model, "disable_adapter"):  # the frozen `ref` adapter, else the adapter switched off
            with reference_model(self.model) as network:
                yield network
        else:  # no LoRA, no reference model: the policy itself (only valid before training, to precompute)
            yield self.model

    def live_reference_logps(self, batch: PairBatch) -> PairLogps:
        with torch.no_grad(), self.reference_network() as network:
            return pair_logps(network, batch, self.hparams.share_prompts)

    def reference_logps(self, batch: PairBatch) -> PairLogps:
        """The reference's log-probs of ``batch`` (the policy's type); override to plug in another reference."""
        if self.reference_mode == "precomputed":
            return self.precomputed(batch)
        return self.live_reference_logps(batch)

    def on_fit_start(self) -> None:
        if self.reference_mode == "precomputed":
            with full_precision_linears(self):  # outside autocast: as the reference always was, in fp32
                self.precomputed.prepare()

    # ------------------------------------------------------------------------------------------ loss
    def policy_logps(self, batch: PairBatch) -> PairLogps:
        return pair_logps(self.model, batch, self.hparams.share_prompts)

    def preference_loss(self, policy: PairLogps, reference: PairLogps, batch: PairBatch) -> LossOutput:
        """Per-pair losses ``[B]``, with the implicit rewards in ``stats["chosen_rewards"]`` and
        ``stats["rejected_rewards"]`` (``[B]``, detached); any other statistic is logged as its mean.

        ``batch`` carries every per-row field of the data (a ``margin``, a ``score``) for a variant that reads one;
        the per-row ``weight`` is applied after this hook, by :meth:`compute_loss`.
        """
        hp = self.hparams
        averaged = getattr(resolve(hp.loss_type, DPO_LOSS_TYPES, "loss_type"), "length_averaged", False)
        chosen, rejected = (policy.chosen_avg, policy.rejected_avg) if averaged else (policy.chosen, policy.rejected)
        ref_chosen, ref_rejected = (
            (reference.chosen_avg, reference.rejected_avg) if averaged else (reference.chosen, reference.rejected)
        )
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=hp.beta,
            loss_type=hp.loss_type,
            label_smoothing=hp.label_smoothing,
            rpo_alpha=hp.rpo_alpha,
            chosen_nll=policy.chosen_nll if hp.rpo_alpha is not None else None,
        )

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_logps(batch)
        output = self.preference_loss(policy, self.reference_logps(batch), batch)
        metrics = preference_metrics(policy, output)
        if self.hparams.rpo_alpha is not None:
            metrics["nll"] = policy.chosen_nll.detach().mean()
        return self.reduce_losses(output.losses, batch), metrics
