"""Losses on unpaired feedback: one completion per example, labelled desirable or undesirable (KTO).

Pure functions on per-sequence log-probs in the TRL convention (``*_logps``: ``[B]``, summed over the completion
tokens), returning per-example losses and statistics as :class:`rlft.outputs.LossOutput`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlft.outputs import LossOutput

__all__ = ["kto_kl", "kto_loss"]


def _check(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected per-example tensors shaped [batch], all the same, got {shapes}")


def kto_kl(
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    *,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""KTO's reference point :math:`z_0`: the batch estimate of :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})`.

    Estimated, as in the paper (https://arxiv.org/abs/2402.01306, sec. 4.1) and TRL, from completions paired with
    *mismatched* prompts of the same batch: :math:`z_0 = \max(0, \frac{1}{m}\sum_i \log\frac{\pi_\theta(y_j|x_i)}
    {\pi_{ref}(y_j|x_i)})`, detached (it is a reference point, not a term to optimise).

    Args:
        policy_kl_logps: ``[B]`` policy log-probs of the mismatched completions.
        reference_kl_logps: ``[B]`` reference log-probs of the same.
        all_reduce_mean: Averages a scalar over data-parallel processes (TRL: the mean of the processes' batch
            means), applied before the clamp; ``None`` in one process.

    Returns:
        A detached scalar ``>= 0``.
    """
    _check(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    if all_reduce_mean is not None:
        kl = all_reduce_mean(kl)
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    r"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 8).

    With the implicit reward :math:`r_\theta(x, y) = \log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}` and the reference
    point :math:`z_0` (:func:`kto_kl`), each example's loss is its weight minus its value:

    .. math::

        L(x, y) = \begin{cases}
            \lambda_D \, (1 - \sigma(\beta (r_\theta(x, y) - z_0))) & y \text{ desirable} \\
            \lambda_U \, (1 - \sigma(\beta (z_0 - r_\theta(x, y)))) & y \text{ undesirable}
        \end{cases}

    (TRL's ``KTOTrainer.kto_loss``, whose losses are these, desirable rows first). The paper advises
    :math:`\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]` when desirable and undesirable examples are unbalanced.

    Args:
        policy_logps: ``[B]`` policy log-probs of the completions.
        reference_logps: ``[B]`` reference log-probs of the completions.
        labels: ``[B]`` bool, true where the completion is desirable.
        kl: The detached reference point :math:`z_0` (a scalar, ``>= 0``; see :func:`kto_kl`).
        beta: Inverse temperature of the implicit reward.
        desirable_weight: :math:`\lambda_D`.
        undesirable_weight: :math:`\lambda_U`.

    Returns:
        ``LossOutput`` with ``[B]`` losses in batch order and stats ``rewards`` (``[B]``, :math:`\beta r_\theta`,
        detached), ``chosen_rewards`` / ``rejected_rewards`` (the rewards of the desirable / undesirable rows only,
        possibly empty) and ``kl`` (the scalar reference point).
    """
    _check(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (true = desirable), got {labels.dtype}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"weights must be >= 0, got {desirable_weight} and {undesirable_weight}")
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logratios = policy_logps - reference_logps
    # desirable: reward above the reference point has value; undesirable: reward below it
    desirable = 1 - torch.sigmoid(beta * (logratios - kl))
    undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    rewards = beta * logratios.detach()
    stats = {"rewards": rewards, "chosen_rewards": rewards[labels], "rejected_rewards": rewards[~labels], "kl": kl}
    return LossOutput(losses, stats)
