"""Training objectives of rlft as pure functions on tensors.

Every loss returns **per-example** (unreduced) values, so methods choose the reduction and a per-row weight can reach
it; the pairwise losses return a :class:`rlft.outputs.LossOutput` (their chosen/rejected rewards in ``stats``).
Log-prob arguments follow the TRL/torchtune convention: ``*_logps`` are per-sequence log-probs (``[B]``, summed over
completion tokens unless a docstring says "length-averaged"), from :func:`rlft.logprobs.gather_logps` and
:func:`rlft.ops.sequence_logps`.

Losses are looked up by name in ``LOSSES``; DPO variants in ``DPO_LOSS_TYPES``. Online-RL losses (PPO, GRPO) live
in :mod:`rlft.rl_losses` and are re-exported here; the K-wise ranking losses live in :mod:`rlft.ranking_losses`
(registered in ``LOSSES``, not re-exported).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlft.ops import masked_mean
from rlft.outputs import LossOutput
from rlft.ranking_losses import RANKING_LOSSES
from rlft.registry import resolve
from rlft.rl_losses import LOSS_AGGREGATIONS, grpo_loss, ppo_policy_loss, ppo_value_loss
from rlft.unpaired_losses import kto_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "LOSSES",
    "LOSS_AGGREGATIONS",
    "bradley_terry_loss",
    "dpo_loss",
    "grpo_loss",
    "kto_loss",
    "log1mexp",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rpo_nll_term",
    "sft_loss",
    "simpo_loss",
]


def _check_batch(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected per-example tensors shaped [batch], all the same, got {shapes}")


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Supervised fine-tuning loss: mean negative log-likelihood of the target tokens of each example.

    .. math:: L_i = -\frac{1}{|y_i|} \sum_{t \in y_i} \log \pi_\theta(y_{i,t} \mid x_i, y_{i,<t})

    (maximum likelihood; e.g. InstructGPT's SFT stage, https://arxiv.org/abs/2203.02155).

    Args:
        token_logps: ``[B, T]`` per-token log-probs of the labels.
        mask: ``[B, T]`` 1 on target tokens (assistant turns), 0 on prompt and padding.

    Returns:
        ``[B]`` per-example mean NLL; an example without target tokens gets 0.
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    return -masked_mean(token_logps, mask, dim=-1)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    r"""Pairwise reward-model loss under the Bradley-Terry model (InstructGPT, https://arxiv.org/abs/2203.02155).

    .. math:: L = -\log\sigma(r_c - r_r - m) + \lambda (r_c + r_r)^2

    ``m`` is Llama 2's preference-strength margin (https://arxiv.org/abs/2307.09288, eq. 2); the centring term
    (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244) keeps rewards near zero and is TRL's
    ``center_rewards_coefficient``. ``.loss`` (the mean) equals TRL ``RewardTrainer``'s loss.

    Args:
        chosen_rewards: ``[B]`` scalar rewards of the preferred responses.
        rejected_rewards: ``[B]`` rewards of the dispreferred responses.
        margin: optional ``[B]`` (or scalar) margin.
        center_coef: ``lambda``; 0 disables the term.

    Returns:
        ``[B]`` losses; stats ``chosen_rewards`` / ``rejected_rewards`` (the inputs, detached).
    """
    _check_batch(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return _with_rewards(losses, chosen_rewards, rejected_rewards)


def _with_rewards(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, **stats) -> LossOutput:
    return LossOutput(losses, {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach(), **stats})


def _dpo_sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # label_smoothing = assumed probability that a label is flipped (conservative DPO)
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _dpo_hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return torch.relu(1 - beta * logits)


def _dpo_ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # beta plays the role of IPO's tau
    return (logits - 1 / (2 * beta)) ** 2


# IPO compares length-averaged log-probs (as TRL does, agreed with the IPO authors); a variant declares this itself
_dpo_ipo.length_averaged = True


def _dpo_robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing (flip rate) in [0, 0.5), got {label_smoothing}")
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped = -label_smoothing * F.logsigmoid(-beta * logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


DPO_LOSS_TYPES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
}
"""DPO variants ``f(logits, beta, label_smoothing) -> losses``; ``logits = (pi_c - ref_c) - (pi_r - ref_r)``.

A variant that compares length-averaged log-probs sets ``f.length_averaged = True``. ``loss_type`` also takes
``module:function`` (see :func:`rlft.registry.resolve`), so your own variant needs no registration."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Callable = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    rpo_alpha: float | None = None,
) -> LossOutput:
    r"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and variants.

    With :math:`h = \log\frac{\pi_\theta(y_c)}{\pi_{ref}(y_c)} - \log\frac{\pi_\theta(y_r)}{\pi_{ref}(y_r)}`:

    * ``sigmoid`` (eq. 7): :math:`-\log\sigma(\beta h)`; with ``label_smoothing`` :math:`\varepsilon` it is
      conservative DPO (cDPO, https://ericmitchell.ai/cdpo.pdf):
      :math:`-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`;
    * ``hinge`` (SLiC, https://arxiv.org/abs/2305.10425): :math:`\max(0, 1 - \beta h)`;
    * ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): :math:`(h - \frac{1}{2\beta})^2`.
      Pass **length-averaged** log-probs, as TRL does internally (agreed with the IPO authors);
    * ``robust`` (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, eq. 9):
      :math:`\frac{-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon\log\sigma(-\beta h)}{1 - 2\varepsilon}`.

    RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733) adds :math:`\alpha \cdot \mathrm{NLL}(y_c)`: pass
    ``chosen_nll`` (``[B]``, e.g. :func:`sft_loss` of the chosen tokens) and ``rpo_alpha``.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` policy log-probs of the rejected responses.
        ref_chosen_logps: ``[B]`` reference log-probs of the chosen responses.
        ref_rejected_logps: ``[B]`` reference log-probs of the rejected responses.
        beta: inverse temperature of the implicit reward (IPO's tau for ``ipo``).
        loss_type: key of ``DPO_LOSS_TYPES``, ``module:function``, or the function itself.
        label_smoothing: label-flip probability for ``sigmoid`` (cDPO) and ``robust``; ignored otherwise.
        chosen_nll: ``[B]`` NLL of the chosen responses for RPO.
        rpo_alpha: RPO weight.

    Returns:
        ``[B]`` losses; stats ``chosen_rewards`` / ``rejected_rewards``: ``beta * (policy - ref)``, detached.
    """
    _check_batch(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    variant = resolve(loss_type, DPO_LOSS_TYPES, "loss_type")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing is a label-flip probability in [0, 0.5], got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if (chosen_nll is None) != (rpo_alpha is None):
        raise ValueError("RPO needs both chosen_nll and rpo_alpha (or neither)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = variant(chosen_logratios - rejected_logratios, beta, label_smoothing)
    if chosen_nll is not None:
        losses = losses + rpo_nll_term(chosen_nll, rpo_alpha)
    return _with_rewards(losses, beta * chosen_logratios, beta * rejected_logratios)


def rpo_nll_term(chosen_nll: torch.Tensor, rpo_alpha: float) -> torch.Tensor:
    r"""RPO's extra term :math:`\alpha \cdot \mathrm{NLL}(y_c)` (https://arxiv.org/abs/2404.19733, eq. 1).

    Args:
        chosen_nll: ``[B]`` per-example NLL of the chosen responses.
        rpo_alpha: weight ``alpha`` (>= 0).

    Returns:
        ``[B]`` term to add to a per-example preference loss.
    """
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    if chosen_nll.dim() != 1:
        raise ValueError(f"chosen_nll must be [batch], got shape {tuple(chosen_nll.shape)}")
    return rpo_alpha * chosen_nll


_LOG_HALF = -math.log(2.0)
_ORPO_MAX_LOGP = -1e-6  # log(1 - p) diverges as p -> 1; clamp keeps the loss and its gradient finite


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (Maechler 2012: switch formula at ``-log 2``).

    Args:
        x: negative values (log-probabilities).

    Returns:
        Tensor shaped like ``x``.
    """
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""Odds-Ratio Preference Optimization (Hong et al. 2024, https://arxiv.org/abs/2403.07691, eqs. 4-7).

    .. math:: L = \mathrm{NLL}(y_c) - \lambda \log\sigma\Big(\log\frac{\mathrm{odds}(y_c)}{\mathrm{odds}(y_r)}\Big),
              \quad \log\mathrm{odds}(y) = \log p - \log(1 - p)

    where :math:`\log p` is the **length-averaged** log-prob (as in the paper and TRL) and ``beta`` is the paper's
    :math:`\lambda`. ``log(1-p)`` uses :func:`log1mexp`. The odds-ratio term equals TRL
    ``ORPOTrainer.odds_ratio_loss``.

    Args:
        policy_chosen_logps: ``[B]`` length-averaged log-probs of the chosen responses (<= 0).
        policy_rejected_logps: ``[B]`` length-averaged log-probs of the rejected responses (<= 0).
        chosen_nll: ``[B]`` SFT loss on the chosen responses (mean token NLL, :func:`sft_loss`).
        beta: weight :math:`\lambda` of the odds-ratio term.

    Returns:
        ``[B]`` losses; stats (detached) ``chosen_rewards`` / ``rejected_rewards`` (``beta * logps``),
        ``log_odds_ratio`` (``log sigma(log OR)``), ``log_odds_chosen`` (``log OR``) and ``nll``.
    """
    _check_batch(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps, chosen_nll=chosen_nll
    )
    if bool((policy_chosen_logps > 1e-4).any() or (policy_rejected_logps > 1e-4).any()):
        raise ValueError("orpo_loss expects length-averaged log-probabilities (<= 0); got positive values")
    chosen = policy_chosen_logps.clamp(max=_ORPO_MAX_LOGP)
    rejected = policy_rejected_logps.clamp(max=_ORPO_MAX_LOGP)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * log_sigmoid_odds
    return _with_rewards(
        losses,
        beta * policy_chosen_logps,
        beta * policy_rejected_logps,
        log_odds_ratio=log_sigmoid_odds.detach(),
        log_odds_chosen=log_odds.detach(),
        nll=chosen_nll.detach(),
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    r"""Simple Preference Optimization (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6), reference-free.

    .. math:: L = -\log\sigma\Big(\frac{\beta}{|y_c|}\log\pi_\theta(y_c) - \frac{\beta}{|y_r|}\log\pi_\theta(y_r)
              - \gamma\Big)

    Inputs are **length-averaged** log-probs. ``gamma`` is the absolute target reward margin :math:`\gamma`
    (TRL ``CPOConfig.simpo_gamma``), not the paper's ``gamma_beta_ratio`` (:math:`\gamma/\beta`); with
    ``label_smoothing`` :math:`\varepsilon` the loss is the conservative form used by TRL's ``CPOTrainer``.

    Args:
        policy_chosen_logps: ``[B]`` length-averaged log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` length-averaged log-probs of the rejected responses.
        beta: reward scale.
        gamma: target margin (in reward units).
        label_smoothing: label-flip probability.

    Returns:
        ``[B]`` losses; stats ``chosen_rewards`` / ``rejected_rewards``: ``beta * logps``, detached.
    """
    _check_batch(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing is a label-flip probability in [0, 0.5], got {label_smoothing}")
    margin = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return _with_rewards(losses, beta * policy_chosen_logps, beta * policy_rejected_logps)


LOSSES: dict[str, Callable[..., object]] = {
    "sft": sft_loss,
    "bradley_terry": bradley_terry_loss,
    "dpo": dpo_loss,
    "orpo": orpo_loss,
    "simpo": simpo_loss,
    "ppo_policy": ppo_policy_loss,
    "ppo_value": ppo_value_loss,
    "grpo": grpo_loss,
    "kto": kto_loss,
    **RANKING_LOSSES,
}
"""Every rlft loss by name; methods and configs select losses through this registry."""
