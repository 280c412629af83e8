"""Paper variants as a researcher writes them on rlft's hooks; each class is under 20 lines."""

import torch.nn.functional as F

from rlft.losses import simpo_loss
from rlft.methods import DPO, GRPO, SimPO
from rlft.outputs import LossOutput


class OverlongGRPO(GRPO):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to L_max - L_cache tokens, then a linear
    penalty down to -1 at L_max and beyond."""

    max_length, cache = 16, 6

    def shape_scores(self, rollout, scores):
        lengths = rollout.response_lengths.to(scores.dtype)
        penalty = ((self.max_length - self.cache - lengths) / self.cache).clamp(-1.0, 0.0)
        return super().shape_scores(rollout, scores) + penalty


class DPOPositive(DPO):
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. 3): penalise the chosen log-prob falling below the
    reference's."""

    lam = 50.0

    def preference_loss(self, policy, reference, batch):
        beta = self.hparams.beta
        chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        penalty = (reference.chosen - policy.chosen).clamp(min=0)
        losses = -F.logsigmoid(beta * (chosen - rejected - self.lam * penalty))
        rewards = {"chosen_rewards": beta * chosen.detach(), "rejected_rewards": beta * rejected.detach()}
        return LossOutput(losses, rewards)


def completion_tokens(prompts, completions, completion_ids, completion_lengths, step, **fields):
    """A reward that reads the token ids, lengths and the global step rlft passes to every reward function."""
    assert [len(ids) for ids in completion_ids] == completion_lengths and isinstance(step, int)
    return [-abs(n - 8) / 8 for n in completion_lengths]


def median_baseline(grouped):
    """A GRPO baseline from YAML (``baseline: my_pkg.variants:median_baseline``): each group's median reward."""
    return grouped.median(dim=1, keepdim=True).values.expand_as(grouped)


def squared_log_ratio(log_ratio):
    """A KL estimator from YAML (``kl: {estimator: my_pkg.variants:squared_log_ratio}``): k2 without the 1/2."""
    return log_ratio**2


class ScheduledSimPO(SimPO):
    """SimPO whose target margin gamma grows with training (a curriculum over the margin): 0 at step 0, the
    configured gamma after ``warmup`` steps."""

    warmup = 4

    def preference_loss(self, policy, batch):
        gamma = self.hparams.gamma * min(1.0, self.global_step / self.warmup)
        beta = self.hparams.beta
        return simpo_loss(policy.chosen_avg, policy.rejected_avg, beta=beta, gamma=gamma)
