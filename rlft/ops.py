"""Pure tensor operations shared by rlft's losses and methods.

Everything here is a stateless function on tensors: no models, no Lightning. Conventions:

* Token-level tensors are ``[B, T]``; ``mask`` is 1 (or True) on positions that count, 0 elsewhere.
* Sequences in RL helpers are right-padded (response tokens first, padding after).
* Log-prob helpers (``gather_logps``, ``hidden_logps``, ``entropy_from_logits``) live in :mod:`rlft.logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlft.registry import resolve

__all__ = [
    "ADVANTAGE_BASELINES",
    "ADVANTAGE_SCALES",
    "KL_ESTIMATORS",
    "gae",
    "group_advantages",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "sequence_logps",
]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of the same shape, got {shapes}")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs over the masked positions of each sequence.

    Args:
        token_logps: ``[B, T]`` per-token log-probs (e.g. from :func:`gather_logps`).
        mask: ``[B, T]`` 1 on the tokens that belong to the scored completion.
        average: return the length-normalised mean instead of the sum (SimPO, ORPO, IPO use means). A sequence
            with no scored token gets 0.

    Returns:
        ``[B]`` per-sequence log-probs.
    """
    _check_same_shape(token_logps=token_logps, mask=mask)
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1.0)


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all processes (identity in one process), so batch statistics cover the global batch."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, all_reduce: Reduce | None = None):
    """Mean of ``x`` over positions where ``mask`` is non-zero (weights allowed), like TRL's ``masked_mean``.

    Args:
        x: values.
        mask: same shape as ``x``; 0/1 or non-negative weights.
        dim: reduce along this dimension; ``None`` reduces everything to a scalar.
        all_reduce: With ``dim=None``, sums the total and the count over processes (the global batch's mean).

    Returns:
        The masked mean. Where the mask sums to 0 the result is 0 (TRL returns NaN there).
    """
    _check_same_shape(x=x, mask=mask)
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    if all_reduce is not None and dim is None:
        total, count = all_reduce(total), all_reduce(count)
    nonempty = count > 0
    # dividing by 1 where nothing is selected keeps autograd free of 0/0 NaNs
    return torch.where(nonempty, total / torch.where(nonempty, count, torch.ones_like(count)), torch.zeros_like(total))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_reduce: Reduce | None = None):
    """Variance of ``x`` over masked positions (scalar), with TRL's Bessel correction ``n / (n - 1)``.

    Args:
        x: values.
        mask: same shape, 0/1.
        unbiased: apply the ``n / (n - 1)`` correction with ``n = mask.sum()``.
        all_reduce: Statistics over the global batch of all processes (see :data:`Reduce`).

    Returns:
        Scalar variance.

    Raises:
        ValueError: if the mask selects nothing, or a single element with ``unbiased=True``.
    """
    count = mask.to(x.dtype).sum()
    count = all_reduce(count) if all_reduce is not None else count
    if count == 0:
        raise ValueError("masked_var: the mask selects no element; check the response mask of this batch")
    centered = x - masked_mean(x, mask, all_reduce=all_reduce)
    variance = masked_mean(centered**2, mask, all_reduce=all_reduce)
    if unbiased:
        if count == 1:
            raise ValueError("masked_var: unbiased variance needs at least 2 masked elements; pass unbiased=False")
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, all_reduce: Reduce | None = None
) -> torch.Tensor:
    """Normalise ``x`` to unit (unbiased) variance over masked positions, as TRL's ``masked_whiten``.

    ``(x - mean) / sqrt(var + eps)``, and the mean is added back when ``shift_mean=False`` (PPO whitens rewards
    without shifting them). Masked-out positions are transformed too; zero them yourself if needed.

    Args:
        x: values, e.g. ``[B, T]`` advantages.
        mask: same shape, 0/1.
        shift_mean: subtract the mean (True) or keep it.
        eps: added to the variance for stability.
        all_reduce: Whiten with the global batch's statistics (see :data:`Reduce`).

    Returns:
        Whitened tensor of ``x``'s shape.
    """
    mean, var = masked_mean(x, mask, all_reduce=all_reduce), masked_var(x, mask, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}
"""Schulman's estimators of KL(pi || ref) from ``log_ratio = ref_logp - logp`` at tokens sampled from pi."""


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` at tokens sampled from ``pi`` (J. Schulman, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html).

    With ``r = pi_ref(x) / pi(x)``: ``k1 = -log r`` (unbiased, high variance, can be negative),
    ``k2 = (log r)^2 / 2`` (biased, low variance), ``k3 = (r - 1) - log r`` (unbiased, always >= 0; GRPO's choice).

    Args:
        logp: ``[...]`` log-probs of the sampled tokens under the policy.
        ref_logp: same shape, under the reference model.
        kind: ``"k1"``, ``"k2"``, ``"k3"`` (see ``KL_ESTIMATORS``) or ``module:function`` of ``log_ratio`` (the
            same shape, ``ref_logp - logp``).

    Returns:
        Per-token estimates, shaped like ``logp``.
    """
    estimator = resolve(kind, KL_ESTIMATORS, "KL estimator")
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    return estimator(ref_logp - logp)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    skip_gaps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438) per token.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``, with
    ``V`` and ``A`` taken as 0 after the last response token (the episode ends there), exactly as TRL's PPO loop.

    Args:
        rewards: ``[B, T]`` per-token rewards (typically the score on the last token minus a per-token KL penalty).
        values: ``[B, T]`` value-head predictions.
        mask: ``[B, T]`` response mask, right-padded (ones then zeros in every row).
        gamma: discount factor.
        lam: GAE lambda.
        skip_gaps: The mask may have zeros between ones (a multi-turn trajectory: the environment's tokens between
            the model's turns). Those positions are not time steps: the model's tokens are packed to the left, GAE
            runs over them as one sequence, and the results go back to their positions (0 in the gaps).

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 on padding. Advantages are not whitened; apply
        :func:`masked_whiten` if the method wants it.

    Raises:
        ValueError: on shape mismatch or a mask that is not right-padded.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"gae expects [batch, time] tensors, got shape {tuple(rewards.shape)}")
    mask = mask.to(rewards.dtype)
    if skip_gaps:
        order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # model tokens first, in order
        packed = [t.gather(1, order) for t in (rewards, values, mask)]
        advantages, returns = gae(*packed, gamma=gamma, lam=lam)
        return torch.zeros_like(rewards).scatter(1, order, advantages), torch.zeros_like(rewards).scatter(
            1, order, returns
        )
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("gae needs right-padded responses: every mask row must be ones followed by zeros")
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)  # [B, T]
    running = torch.zeros_like(rewards[:, 0])  # [B] A_{t+1}; 0 past the end
    next_values = torch.zeros_like(running)  # [B] V_{t+1}; padding has V = 0, so a row's last token bootstraps 0
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # [B]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _group_mean_baseline(grouped: torch.Tensor) -> torch.Tensor:
    return grouped.mean(dim=1, keepdim=True).expand_as(grouped)


def _leave_one_out_baseline(grouped: torch.Tensor) -> torch.Tensor:
    group_size = grouped.shape[1]
    if group_size < 2:
        raise ValueError("the leave-one-out (RLOO) baseline needs group_size >= 2")
    return (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)


ADVANTAGE_BASELINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _group_mean_baseline,  # GRPO (Shao et al. 2024)
    "leave_one_out": _leave_one_out_baseline,  # RLOO (Ahmadian et al. 2024)
}


def _group_std(grouped: torch.Tensor) -> torch.Tensor:
    if grouped.shape[1] < 2:
        return torch.zeros_like(grouped)
    return grouped.std(dim=1, keepdim=True).expand_as(grouped)


def _batch_std(grouped: torch.Tensor) -> torch.Tensor:
    if grouped.numel() < 2:
        return torch.zeros_like(grouped)
    return grouped.std().expand_as(grouped)


def _no_scale(grouped: torch.Tensor) -> None:
    return None


ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "std": _group_std,  # GRPO: divide by the group's (unbiased) reward std
    "batch": _batch_std,  # divide by the whole batch's std (TRL scale_rewards="batch")
    "none": _no_scale,  # Dr. GRPO (Liu et al. 2025): no std scaling, which biases towards easy/hard prompts
}


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str = "std",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Outcome advantages for completions sampled in groups from the same prompt (GRPO / Dr. GRPO / RLOO).

    ``A_i = (r_i - b_i) / (s_i + eps)`` where the baseline ``b`` is the group mean (GRPO, https://arxiv.org/abs/2402.03300)
    or the mean of the *other* completions of the group (RLOO, https://arxiv.org/abs/2402.14740), and ``s`` is the
    group's unbiased reward std (``scale="std"``), the batch std (``"batch"``) or nothing (``"none"``, Dr. GRPO,
    https://arxiv.org/abs/2503.20783). GRPO with ``scale="std", eps=1e-4`` equals TRL's ``GRPOTrainer``.

    Args:
        rewards: ``[N]`` scalar rewards, ``N = num_prompts * group_size``, completions of one prompt contiguous.
        group_size: completions per prompt.
        baseline: key of ``ADVANTAGE_BASELINES`` or ``module:function`` (``[P, G]`` rewards -> ``[P, G]``).
        scale: key of ``ADVANTAGE_SCALES`` or ``module:function`` (``[P, G]`` -> ``[P, G]`` divisor, or ``None``).
        eps: added to the std.

    Returns:
        ``[N]`` advantages.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    baseline_of = resolve(baseline, ADVANTAGE_BASELINES, "baseline")
    scale_of = resolve(scale, ADVANTAGE_SCALES, "scale")
    grouped = rewards.view(-1, group_size)  # [P, G]: the completions of one prompt in a row
    advantages = grouped - baseline_of(grouped)
    std = scale_of(grouped)
    if std is not None:
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)


def last_token_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, R]`` tensor with each row's score on its last response token (right-padded mask), zeros elsewhere."""
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    placed = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device)
    placed[torch.arange(mask.shape[0], device=mask.device), last] = scores
    return placed
