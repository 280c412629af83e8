"""Policy-gradient losses for online RL: PPO (policy and value) and GRPO.

Each function returns a :class:`rlft.outputs.LossOutput` (it unpacks as ``losses, stats``): ``losses`` is ``[B]``
(one value per sequence, to be averaged by the caller) and ``stats`` a dict of detached ``[B]`` tensors to log. All
functions are public through :mod:`rlft.losses`, where they are registered in ``LOSSES``.

How token losses become one value per sequence is chosen by name from ``LOSS_AGGREGATIONS``; in every case the
plain mean of the returned ``[B]`` vector is the batch loss of the corresponding reference implementation:

* ``"sequence"`` — mean over each sequence's tokens (GRPO paper, TRL ``loss_type="grpo"``);
* ``"token"`` — mean over all tokens of the batch (PPO in TRL, TRL ``loss_type="bnpo"``, DAPO); row ``i`` gets
  ``sum_t l_it * B / num_tokens`` so that ``losses.mean()`` is the token mean (rows then depend on the batch);
* ``"dr_grpo"`` — sum over tokens divided by a constant ``max_new_tokens`` (Dr. GRPO, TRL ``loss_type="dr_grpo"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlft.ops import kl_estimate, masked_mean
from rlft.outputs import LossOutput
from rlft.registry import resolve


def _sequence_mean(token_losses: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | None) -> torch.Tensor:
    return masked_mean(token_losses, mask, dim=-1)


def _token_mean(token_losses: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | None) -> torch.Tensor:
    num_tokens = mask.sum().clamp(min=1.0)
    return (token_losses * mask).sum(-1) * (mask.shape[0] / num_tokens)


def _constant_normaliser(token_losses: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | None) -> torch.Tensor:
    length = mask.shape[-1] if max_new_tokens is None else max_new_tokens
    return (token_losses * mask).sum(-1) / length


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    "sequence": _sequence_mean,
    "token": _token_mean,
    "dr_grpo": _constant_normaliser,
}


def aggregate_tokens(
    token_losses: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int | None = None
) -> torch.Tensor:
    """``[B, T]`` token losses as ``[B]`` per-sequence losses, aggregated by ``how`` (a ``LOSS_AGGREGATIONS`` key or
    ``module:function``); linear in the token losses, so terms can be aggregated apart and added."""
    return resolve(how, LOSS_AGGREGATIONS, "loss aggregation")(token_losses, mask, max_new_tokens)


def _check_token_inputs(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected [batch, time] tensors of one shape, got {shapes}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    loss_aggregation: str = "token",
    max_new_tokens: int | None = None,
) -> LossOutput:
    r"""PPO clipped surrogate objective (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), per token.

    .. math:: L = \max\big(-A_t\, \rho_t,\; -A_t\, \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\big),
              \quad \rho_t = \exp(\log\pi_\theta(a_t) - \log\pi_{old}(a_t))

    With ``loss_aggregation="token"`` (default) ``losses.mean()`` equals TRL's PPO ``pg_loss`` (masked mean over all
    response tokens of the batch).

    Args:
        logprobs: ``[B, T]`` log-probs of the taken tokens under the current policy (with grad).
        old_logprobs: ``[B, T]`` the same under the rollout policy (no grad).
        advantages: ``[B, T]`` advantages (e.g. whitened GAE).
        mask: ``[B, T]`` response mask.
        clip_range: ``epsilon``.
        loss_aggregation: key of ``LOSS_AGGREGATIONS``.
        max_new_tokens: normaliser for ``"dr_grpo"``; defaults to ``T``.

    Returns:
        ``(losses [B], stats)`` with per-sequence ``clipfrac`` (fraction of tokens where the clipped branch is
        active) and ``approx_kl`` (``0.5 * (log rho)^2``, as TRL logs it).
    """
    _check_token_inputs(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = aggregate_tokens(torch.maximum(unclipped, clipped), mask, loss_aggregation, max_new_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask, dim=-1),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask, dim=-1),
            "ratio": masked_mean(ratio, mask, dim=-1),
        }
    return LossOutput(losses, stats)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float = 0.2,
    loss_aggregation: str = "token",
    max_new_tokens: int | None = None,
) -> LossOutput:
    r"""Clipped value-function loss of PPO as used for RLHF (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593).

    .. math:: L = \tfrac12 \max\big((V - R)^2,\; (\mathrm{clip}(V, V_{old}-\epsilon, V_{old}+\epsilon) - R)^2\big)

    With the default ``loss_aggregation="token"``, ``losses.mean()`` equals TRL's ``vf_loss``.

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` value predictions at rollout time.
        returns: ``[B, T]`` GAE returns.
        mask: ``[B, T]`` response mask.
        clip_range_value: ``epsilon`` for the value clip.
        loss_aggregation: key of ``LOSS_AGGREGATIONS``.
        max_new_tokens: normaliser for ``"dr_grpo"``; defaults to ``T``.

    Returns:
        ``(losses [B], stats)`` with per-sequence ``value_clipfrac``.
    """
    _check_token_inputs(values=values, old_values=old_values, returns=returns, mask=mask)
    mask = mask.to(values.dtype)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    worst = torch.maximum(unclipped_error, clipped_error)
    losses = 0.5 * aggregate_tokens(worst, mask, loss_aggregation, max_new_tokens)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).to(mask.dtype), mask, dim=-1)}
    return LossOutput(losses, stats)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    beta: float = 0.04,
    loss_aggregation: str = "sequence",
    max_new_tokens: int | None = None,
) -> LossOutput:
    r"""GRPO objective (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300, eq. 3), per token.

    .. math:: l_t = -\min\big(\rho_t A,\; \mathrm{clip}(\rho_t, 1-\epsilon_{low}, 1+\epsilon_{high}) A\big)
              + \beta\, \big(\tfrac{\pi_{ref}}{\pi_\theta} - \log\tfrac{\pi_{ref}}{\pi_\theta} - 1\big)

    The KL term is Schulman's ``k3`` estimator. ``clip_range_high`` gives DAPO's asymmetric "clip-higher"
    (https://arxiv.org/abs/2503.14476). Token losses are aggregated by ``loss_aggregation``: ``"sequence"`` is
    TRL's ``grpo``, ``"token"`` TRL's ``bnpo``, ``"dr_grpo"`` TRL's ``dr_grpo`` (divide by ``max_new_tokens``, default
    ``T``). With matching settings ``losses.mean()`` equals TRL ``GRPOTrainer``'s loss.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (with grad).
        old_logprobs: ``[B, T]`` log-probs at sampling time (pass ``logprobs.detach()`` for one update per batch).
        ref_logprobs: ``[B, T]`` reference-model log-probs; may be ``None`` only when ``beta == 0``.
        advantages: ``[B]`` sequence advantages (see :func:`rlft.ops.group_advantages`) or ``[B, T]``.
        mask: ``[B, T]`` completion mask.
        clip_range: ``epsilon_low`` (and ``epsilon_high`` unless given).
        clip_range_high: ``epsilon_high``.
        beta: KL coefficient.
        loss_aggregation: key of ``LOSS_AGGREGATIONS``.
        max_new_tokens: normaliser for ``"dr_grpo"`` (the generation budget); defaults to ``T``.

    Returns:
        ``(losses [B], stats)`` with per-sequence ``kl`` (when ``beta != 0``), ``clipfrac`` (tokens whose ratio is
        clipped in the direction that matters), ``clipfrac_low``, ``clipfrac_high``.
    """
    _check_token_inputs(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("grpo_loss: ref_logprobs is required when beta != 0 (pass beta=0.0 to drop the KL term)")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, logprobs {logprobs.shape[0]}")
        advantages = advantages.unsqueeze(-1)
    eps_high = clip_range if clip_range_high is None else clip_range_high
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_range, 1.0 + eps_high)
    token_losses = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        per_token_kl = kl_estimate(logprobs, ref_logprobs, kind="k3")
        token_losses = token_losses + beta * per_token_kl
        stats["kl"] = masked_mean(per_token_kl.detach(), mask, dim=-1)
    losses = aggregate_tokens(token_losses, mask, loss_aggregation, max_new_tokens)
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_range) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1.0 + eps_high) & (advantages > 0)).to(mask.dtype)
        stats["clipfrac_low"] = masked_mean(low, mask, dim=-1)
        stats["clipfrac_high"] = masked_mean(high, mask, dim=-1)
        stats["clipfrac"] = stats["clipfrac_low"] + stats["clipfrac_high"]
    return LossOutput(losses, stats)
