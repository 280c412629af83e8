"""Online-RL variants as a researcher writes them on the online core's hooks; each under 25 lines."""

import json

import lightning as L
import torch
import torch.nn.functional as F

from rlft.methods import GRPO, ReinforcePP
from rlft.ops import masked_mean
from rlft.outputs import LossOutput


class GSPO:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one length-normalised importance ratio per sequence, clipped.
    Written once as a mixin: ``GSPOGRPO`` and ``GSPOReinforce`` run it unchanged on two estimators."""

    def policy_loss(self, batch, logps, advantages):
        mask = batch.response_mask
        ratio = masked_mean(logps - batch.logps, mask, dim=-1).exp()
        advantage = masked_mean(advantages, mask, dim=-1)
        eps = self.hparams.clip_range
        losses = -torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
        return LossOutput(losses, {"clipfrac": ((ratio - 1).abs() > eps).float()})


class GSPOGRPO(GSPO, GRPO):
    pass


class GSPOReinforce(GSPO, ReinforcePP):
    pass


class GroupDPO(GRPO):
    """Online DPO with a judge (Guo et al. 2024, arXiv 2402.04792): in each group the best- and the worst-judged
    samples are a pair, trained with DPO's loss against the reference. One override: the loss."""

    needs_reference = True  # the loss reads the reference's log-probs even with the KL term off

    def policy_loss(self, batch, logps, advantages):
        mask = batch.response_mask.to(logps.dtype)
        margins = ((logps - batch.ref_logps) * mask).sum(-1)
        losses = torch.zeros_like(margins)
        for group in batch.group_ids.unique():
            rows = (batch.group_ids == group).nonzero().squeeze(-1)
            best, worst = rows[batch.rewards[rows].argmax()], rows[batch.rewards[rows].argmin()]
            if batch.rewards[best] > batch.rewards[worst]:
                losses[best] = -F.logsigmoid(0.1 * (margins[best] - margins[worst]))
        return LossOutput(losses * len(losses) / max(1, int((losses != 0).sum())), {})


class RolloutLengthLogger(L.Callback):
    """A callback that sees every rollout (``outputs["rollout"]``) and logs its longest response."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("train/longest_response", outputs["rollout"].response_lengths.max().float())


def json_answer(prompts, completions, stage, **fields):
    """A verifiable JSON-answer reward that knows the stage and reports how many replies were valid JSON."""
    valid = []
    for text in completions:
        try:
            valid.append(isinstance(json.loads(text), dict))
        except ValueError:
            valid.append(False)
    rewards = [1.0 if ok else -min(1.0, len(text) / 64) for ok, text in zip(valid, completions)]
    return rewards, {"valid_json": sum(valid) / len(valid), "is_validation": float(stage == "validate")}
