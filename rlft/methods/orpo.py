"""Reference-free preference optimisation: ORPO and SimPO.

Both score chosen and rejected in one concatenated forward (:func:`rlft.methods.dpo.pair_logps`) and compare
**length-averaged** log-probs, so no reference model is loaded or run. A per-row ``weight`` of the pairs weights each
pair's loss in the batch mean; ``preference_loss(policy, batch)`` is the hook to override.
"""

from __future__ import annotations

import torch

from rlft.data.batches import PairBatch
from rlft.losses import orpo_loss, simpo_loss
from rlft.methods.base import RLFTModule
from rlft.methods.dpo import preference_metrics
from rlft.models.scoring import PairLogps, pair_logps
from rlft.outputs import LossOutput


def _average_metrics(logps: PairLogps, output: LossOutput) -> dict:
    metrics = preference_metrics(logps, output)
    # these methods optimise length-averaged log-probs, so report those (as TRL's ORPO/CPO trainers do)
    metrics["logps/chosen"] = logps.chosen_avg.detach().mean()
    metrics["logps/rejected"] = logps.rejected_avg.detach().mean()
    return metrics


class ORPO(RLFTModule):
    """Odds-Ratio Preference Optimization (https://arxiv.org/abs/2403.07691): SFT on chosen + odds-ratio term.

    Logs ``{train,val}/rewards/*`` (``beta`` x mean log-prob), ``logps/*`` (length-averaged), ``nll``,
    ``log_odds_ratio`` and ``log_odds_chosen``.

    Args:
        beta: Weight ``lambda`` of the odds-ratio term.
        disable_dropout: Switch dropout off so chosen and rejected are scored by the same network.
        share_prompts: Run each pair's common prompt once for both responses (exact: the same log-probs; about a
            third fewer tokens through the network on HH-RLHF). Needs an SDPA model; others ignore it.
    """

    default_lr = 8e-6
    data_kind = "pairs"
    uses_fields = frozenset({"weight"})

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        disable_dropout: bool = True,
        share_prompts: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)

    def preference_loss(self, policy: PairLogps, batch: PairBatch) -> LossOutput:
        """Per-pair losses ``[B]`` and the statistics of :func:`rlft.losses.orpo_loss` (``chosen_rewards`` and
        ``rejected_rewards`` among them); ``batch`` carries the data's per-row fields. Override for a variant."""
        return orpo_loss(policy.chosen_avg, policy.rejected_avg, policy.chosen_nll, beta=self.hparams.beta)

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = pair_logps(self.model, batch, self.hparams.share_prompts)
        output = self.preference_loss(logps, batch)
        return self.reduce_losses(output.losses, batch), _average_metrics(logps, output)


class SimPO(RLFTModule):
    """Simple Preference Optimization (https://arxiv.org/abs/2405.14734): length-normalised reward with a margin.

    Args:
        beta: Reward scale.
        gamma: Target reward margin (absolute, in reward units; the paper's ``gamma/beta`` ratio times ``beta``).
        label_smoothing: Label-flip probability (conservative form).
        nll_weight: Weight of an extra NLL term on the chosen responses (CPO-SimPO); 0 disables it.
        disable_dropout: Switch dropout off so chosen and rejected are scored by the same network.
        share_prompts: Run each pair's common prompt once for both responses (exact: the same log-probs; about a
            third fewer tokens through the network on HH-RLHF). Needs an SDPA model; others ignore it.
    """

    default_lr = 1e-6
    data_kind = "pairs"
    uses_fields = frozenset({"weight"})

    def __init__(
        self,
        model: str,
        beta: float = 2.0,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        disable_dropout: bool = True,
        share_prompts: bool = True,
        **kwargs,
    ) -> None:
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        super().__init__(model, **kwargs)

    def preference_loss(self, policy: PairLogps, batch: PairBatch) -> LossOutput:
        """Per-pair losses ``[B]`` with the rewards in ``stats["chosen_rewards"]`` / ``stats["rejected_rewards"]``;
        ``batch`` carries the data's per-row fields. The CPO-SimPO NLL term is added after this hook."""
        hp = self.hparams
        return simpo_loss(
            policy.chosen_avg, policy.rejected_avg, beta=hp.beta, gamma=hp.gamma, label_smoothing=hp.label_smoothing
        )

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        logps = pair_logps(self.model, batch, self.hparams.share_prompts)
        output = self.preference_loss(logps, batch)
        metrics = _average_metrics(logps, output)
        losses = output.losses
        if hp.nll_weight:
            losses = losses + hp.nll_weight * logps.chosen_nll
            metrics["nll"] = logps.chosen_nll.detach().mean()
        return self.reduce_losses(losses, batch), metrics
