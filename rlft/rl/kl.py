"""The KL-to-reference settings every online method shares (one ``kl:`` block in every config)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from rlft.ops import KL_ESTIMATORS
from rlft.registry import resolve


@dataclass(frozen=True)  # frozen: a default instance is shared by every signature that uses it
class KLSettings:
    """The KL to the reference, the same block for every online method; unset fields take the method's default.

    Args:
        coef: Weight of the KL (initial value when ``target`` is set); 0 switches it and the reference forward off.
        estimator: Per-token estimator of ``KL(pi || ref)``: ``k1`` (``log pi - log ref``), ``k2``, ``k3`` or
            ``module:function`` (see :func:`rlft.ops.kl_estimate`).
        placement: ``reward`` subtracts ``coef * KL_t`` from each token's reward (PPO, REINFORCE++); ``loss`` adds
            ``coef * KL_t`` to each token's loss (GRPO).
        target: Adaptive controller (Ziegler et al. 2019): steer ``coef`` so the mean per-sequence KL approaches
            this value; ``null`` keeps ``coef`` fixed.
        horizon: Adaptive controller horizon in sequences (larger = slower adaptation).
    """

    coef: float | None = None
    estimator: str | None = None
    placement: Literal["reward", "loss"] | None = None
    target: float | None = None
    horizon: int = 10_000

    def __post_init__(self) -> None:
        if self.estimator is not None:
            resolve(self.estimator, KL_ESTIMATORS, "KL estimator")  # a typo fails here, not at the first step
        if self.placement not in (None, "reward", "loss"):
            raise ValueError(f"kl.placement must be 'reward' or 'loss', got {self.placement!r}")
        if self.coef is not None and self.coef < 0:
            raise ValueError(f"kl.coef must be >= 0, got {self.coef}")

    def with_defaults(self, defaults: KLSettings) -> KLSettings:
        """These settings with every unset field taken from ``defaults`` (a method's own)."""
        unset = {
            name: getattr(defaults, name) for name in ("coef", "estimator", "placement") if getattr(self, name) is None
        }
        return replace(self, **unset)

    def update(self, coef: float, observed_kl: float, sequences: int) -> float:
        """Next coefficient of the adaptive controller (unchanged when ``target`` is null)."""
        if self.target is None:
            return coef
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        return coef * (1.0 + error * sequences / self.horizon)
