"""``LossOutput``: the one type every rlft loss and loss hook returns.

A loss is **per example** (``losses``: ``[B]``, unreduced, so the caller picks the reduction and a per-row weight can
reach it) plus detached statistics to log (``stats``: each ``[B]`` or a scalar). It unpacks as
``losses, stats = loss_fn(...)``, so the pure functions read the same whether a caller wants the type or the pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Per-example losses and their statistics.

    Attributes:
        losses: ``[B]`` per-example losses (with grad).
        stats: Named detached statistics, ``[B]`` per example or a scalar (e.g. ``chosen_rewards``, ``clipfrac``).
    """

    losses: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        # `losses, stats = output`: the older two-value dialect keeps working
        return iter((self.losses, self.stats))

    @property
    def loss(self) -> torch.Tensor:
        """The plain mean: what a method optimises unless it weights rows."""
        return self.losses.mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Every statistic reduced to a detached scalar (the mean over examples), for logging."""
        return {name: value.detach().float().mean() for name, value in self.stats.items()}

    def plus(self, other: LossOutput, weight: float = 1.0) -> LossOutput:
        """This output with ``weight * other.losses`` added per example and ``other``'s statistics merged in."""
        return LossOutput(self.losses + weight * other.losses, {**self.stats, **other.stats})
