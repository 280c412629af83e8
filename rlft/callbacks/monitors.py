"""Warn (or stop) when an online-RL run goes wrong: KL running away, entropy collapse, length hacking, clipping.

:class:`RunMonitor` reads what GRPO, PPO and REINFORCE++ log every step (``train/kl``, ``train/entropy``,
``train/reward``, ``train/stop_rate``, ``train/clipfrac``) from ``trainer.callback_metrics`` after each training
batch (one rollout). Each condition warns once when it starts, logs ``monitor/<condition>`` (0/1) every step, and
may warn again only after it stayed clear for ``rearm_steps`` steps. Methods that log none of these metrics (SFT,
DPO, ...) leave it a no-op::

    trainer:
      callbacks:
        - class_path: rlft.callbacks.RunMonitor
          init_args: {window: 50, clip_threshold: 0.4, action: stop}
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

import lightning as L

log = logging.getLogger(__name__)

KEYS = ("train/kl", "train/entropy", "train/reward", "train/stop_rate", "train/clipfrac", "train/response_length")
KL, ENTROPY, REWARD, STOP_RATE, CLIPFRAC, LENGTH = KEYS
CONDITIONS = ("kl_growth", "entropy_collapse", "length_hacking", "clip_saturation")


def trend(values: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope per step of ``values`` and its t statistic (``+-inf`` for an exact line, 0 if flat).

    A t statistic because reward units are arbitrary: "is the rise larger than the step-to-step noise" means the same
    for a 0-1 accuracy and a reward model's logits."""
    n = len(values)
    if n < 3:
        return 0.0, 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx
    residual = sum((v - mean_y - slope * (i - mean_x)) ** 2 for i, v in enumerate(values))
    error = math.sqrt(residual / (n - 2) / sxx)
    if error <= 1e-12 * max(1.0, abs(mean_y)):  # an exact line: float round-off, not noise
        return slope, math.copysign(math.inf, slope) if slope else 0.0
    return slope, slope / error


def kl_growing(kl: Sequence[float], max_growth: float, floor: float) -> bool:
    """Whether the KL's trend-line rise over ``kl`` exceeds ``max_growth * (its mean + floor)``.

    Relative to the level, so ``max_growth`` means the same for GRPO's per-token KL and PPO's per-sequence sum (only
    the floor is in KL units) and steady healthy drift (a small rise on a large level) passes; the floor keeps the
    first steps, when KL climbs from exactly 0, from counting as infinite growth. The least-squares fit over the
    window averages single-step spikes away (fewer than 3 values: no trend, never growing).
    """
    rise = trend(kl)[0] * (len(kl) - 1)
    return rise > max_growth * (statistics.fmean(kl) + floor)


def entropy_collapsed(recent: Sequence[float], baseline: float, min_ratio: float, floor: float) -> bool:
    """Whether the median of ``recent`` entropies fell below ``min_ratio * baseline`` or below ``floor``."""
    # the median, so one low-entropy rollout (e.g. a batch of easy prompts) is not a collapse
    return bool(recent) and statistics.median(recent) < max(min_ratio * baseline, floor)


def length_hacking(rewards: Sequence[float], stop_rates: Sequence[float], min_t: float, max_truncated: float) -> bool:
    """Whether the reward trends up (t >= ``min_t``) while the mean truncated share ``1 - stop_rate`` is above
    ``max_truncated``: reward bought by responses that never end rather than by better answers."""
    return bool(stop_rates) and trend(rewards)[1] >= min_t and 1.0 - statistics.fmean(stop_rates) > max_truncated


def clip_saturated(clipfracs: Sequence[float], threshold: float, steps: int) -> bool:
    """Whether the last ``steps`` clip fractions were all above ``threshold`` (one high step is a normal update)."""
    return len(clipfracs) >= steps and all(c > threshold for c in list(clipfracs)[-steps:])


class _Latch:
    """Fires on the first active step, then stays quiet until the condition has been clear ``rearm`` steps in a
    row (a value hovering at a threshold would otherwise warn on every crossing)."""

    def __init__(self, rearm: int) -> None:
        self.rearm, self.fired, self.clear = rearm, False, 0

    def update(self, active: bool) -> bool:
        newly = active and not self.fired
        self.clear = 0 if active else self.clear + 1
        self.fired = active or (self.fired and self.clear < self.rearm)
        return newly


class RunMonitor(L.Callback):
    """Warns, with the numbers and what to try, when an online-RL run shows one of four known failure patterns.

    Windows count training batches (rollouts), not optimiser steps. KL thresholds are in ``train/kl``'s units:
    GRPO logs the per-token mean, PPO and REINFORCE++ the per-sequence sum (raise ``kl_floor`` to about your
    typical per-sequence KL there).

    Args:
        window: Recent rollouts the trends and levels are computed over; the first ``window`` entropies are the
            early value entropy is compared with.
        kl_max_growth: Warn when the KL's trend-line rise over the window exceeds this times (window mean KL +
            ``kl_floor``). 1.0: a linear rise from a to b fires once b - a > (a + b) / 2 + kl_floor (b > ~3a).
        kl_floor: Absolute KL added to the level, so a KL climbing from 0 is not "infinite" growth.
        entropy_min_ratio, entropy_floor: Warn when the recent median entropy is below this share of the early
            mean, or below this absolute entropy (nats per token).
        reward_min_t, max_truncated: Warn when the reward's trend over the window has at least this t statistic
            while more than this share of responses were cut at ``max_new_tokens`` (``1 - stop_rate``). On a
            flat noisy reward t >= 3 happens by chance on ~0.5% of steps with window 20 (~1% with 10).
        clip_threshold, clip_steps: Warn when ``train/clipfrac`` is above this for this many consecutive rollouts.
        rearm_steps: A condition warns again only after staying clear this many consecutive rollouts.
        action: ``warn`` only logs; ``stop`` also ends training (``trainer.should_stop``) at the first warning.
    """

    def __init__(
        self,
        window: int = 20,
        kl_max_growth: float = 1.0,
        kl_floor: float = 0.1,
        entropy_min_ratio: float = 0.1,
        entropy_floor: float = 0.02,
        reward_min_t: float = 3.0,
        max_truncated: float = 0.5,
        clip_threshold: float = 0.3,
        clip_steps: int = 5,
        rearm_steps: int = 5,
        action: Literal["warn", "stop"] = "warn",
    ) -> None:
        if window < 3 or clip_steps < 1 or rearm_steps < 1:  # a trend needs 3 points
            raise ValueError(
                f"RunMonitor needs window >= 3, clip_steps and rearm_steps >= 1; got {window}, "
                f"{clip_steps}, {rearm_steps}"
            )
        if action not in ("warn", "stop"):
            raise ValueError(f"RunMonitor action must be 'warn' or 'stop', got {action!r}")
        self.window, self.action, self.rearm_steps, self.clip_steps = window, action, rearm_steps, clip_steps
        self.kl_max_growth, self.kl_floor = kl_max_growth, kl_floor
        self.entropy_min_ratio, self.entropy_floor = entropy_min_ratio, entropy_floor
        self.reward_min_t, self.max_truncated, self.clip_threshold = reward_min_t, max_truncated, clip_threshold
        self.reset()

    def reset(self) -> None:
        # the clip condition looks at its last clip_steps values, every other one at the last window
        self.history = {k: deque(maxlen=self.clip_steps if k == CLIPFRAC else self.window) for k in KEYS}
        self.entropy_baseline: float | None = None
        self.latches = {name: _Latch(self.rearm_steps) for name in CONDITIONS}

    def state_dict(self) -> dict:
        # a resumed run keeps its early entropy: re-measuring it after a collapse would hide the collapse
        latches = {k: (v.fired, v.clear) for k, v in self.latches.items()}
        history = {k: list(v) for k, v in self.history.items()}
        return {"history": history, "entropy_baseline": self.entropy_baseline, "latches": latches}

    def load_state_dict(self, state_dict: dict) -> None:
        for key, values in state_dict.get("history", {}).items():
            self.history[key].extend(values)
        self.entropy_baseline = state_dict.get("entropy_baseline")
        for name, (fired, clear) in state_dict.get("latches", {}).items():
            self.latches[name].fired, self.latches[name].clear = fired, clear

    def setup(self, trainer, pl_module, stage: str) -> None:
        # runs before a checkpoint's callback state is restored: a fresh fit starts clean, a resume gets its history
        if stage == "fit":
            self.reset()

    def _checks(self, seen: set[str], step: int) -> dict[str, tuple[bool, Callable[[], str]]]:
        """``condition -> (active, message)`` for the conditions whose metrics were logged this step."""
        checks: dict[str, tuple[bool, Callable[[], str]]] = {}
        n = self.window
        if KL in seen:
            kl = list(self.history[KL])
            active = len(kl) >= n and kl_growing(kl, self.kl_max_growth, self.kl_floor)
            checks["kl_growth"] = (
                active,
                lambda: (
                    f"KL to the reference is running away at step {step}: train/kl rose "
                    f"{trend(kl)[0] * (n - 1):.3g} over the last {n} rollouts to {kl[-1]:.3g} (more than "
                    f"kl_max_growth={self.kl_max_growth} x (window mean {statistics.fmean(kl):.3g} + "
                    f"kl_floor={self.kl_floor})). The policy is leaving the reference faster than the KL term holds "
                    "it; try a lower optim.lr, a larger KL weight (kl.coef) or a "
                    "smaller clip_range."
                ),
            )
        if ENTROPY in seen:
            entropy = list(self.history[ENTROPY])
            if self.entropy_baseline is None and len(entropy) >= n:
                self.entropy_baseline = statistics.fmean(entropy)
            base = self.entropy_baseline
            active = base is not None and entropy_collapsed(entropy, base, self.entropy_min_ratio, self.entropy_floor)
            checks["entropy_collapse"] = (
                active,
                lambda: (
                    f"policy entropy collapsed at step {step}: train/entropy is "
                    f"{statistics.median(entropy):.3g} (median of the last {len(entropy)} rollouts), "
                    f"{statistics.median(entropy) / max(base, 1e-12):.0%} of its "
                    f"early {base:.3g} (limit: below entropy_min_ratio={self.entropy_min_ratio} x early or "
                    f"entropy_floor={self.entropy_floor}). Near-identical samples leave a group nothing to compare, so "
                    "advantages vanish and exploration stops; try a lower optim.lr, a higher sampling.temperature, "
                    "GRPO clip_range_high (DAPO's clip-higher) or a larger KL weight."
                ),
            )
        if REWARD in seen and STOP_RATE in seen:
            rewards, stops, lengths = (list(self.history[k]) for k in (REWARD, STOP_RATE, LENGTH))
            active = len(rewards) >= n and length_hacking(rewards, stops, self.reward_min_t, self.max_truncated)
            length = f", mean length {statistics.fmean(lengths):.1f} tokens" if lengths else ""
            checks["length_hacking"] = (
                active,
                lambda: (
                    f"reward is rising while responses hit the length cap at step {step}: train/reward went "
                    f"{rewards[0]:.3g} -> {rewards[-1]:.3g} over the last {n} rollouts "
                    f"(trend t={trend(rewards)[1]:.1f} >= reward_min_t={self.reward_min_t}) while "
                    f"{1 - statistics.fmean(stops):.0%} of responses were cut at sampling.max_new_tokens (limit "
                    f"max_truncated={self.max_truncated}{length}). The policy may be buying reward with length; read "
                    "some samples, then try missing_eos_penalty, a length term in the reward, or a larger "
                    "sampling.max_new_tokens if the answers need the room."
                ),
            )
        if CLIPFRAC in seen:
            clip = list(self.history[CLIPFRAC])
            active = clip_saturated(clip, self.clip_threshold, self.clip_steps)
            checks["clip_saturation"] = (
                active,
                lambda: (
                    f"clip fraction saturated at step {step}: train/clipfrac stayed above clip_threshold="
                    f"{self.clip_threshold} for {self.clip_steps} consecutive rollouts (last {clip[-1]:.3g}). Updates "
                    "push the probability ratio past the clip range, so most tokens give no gradient; try a lower "
                    "optim.lr, fewer epochs, a larger minibatch_size or PPO's target_approx_kl."
                ),
            )
        return checks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen = set()
        for key, history in self.history.items():
            value = trainer.callback_metrics.get(key)
            if value is not None and math.isfinite(value := float(value)):  # non-finite: NonFiniteGuard's job
                history.append(value)
                seen.add(key)
        checks = self._checks(seen, trainer.global_step)
        if not checks:
            return
        chief = getattr(trainer, "is_global_zero", True)
        reasons = []
        for name, (active, message) in checks.items():
            pl_module.log(f"monitor/{name}", float(active))
            if self.latches[name].update(active):
                reasons.append(name)
                if chief:
                    log.warning("RunMonitor: %s", message())
        if self.action != "stop":
            return
        stop = bool(reasons)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None:  # every rank must stop together, or the others wait forever in a collective
            stop = strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            if chief:
                why = ", ".join(reasons) or "a condition seen on another process"
                log.error("RunMonitor stopped training at step %d (action='stop'): %s", trainer.global_step, why)


__all__ = ["RunMonitor", "clip_saturated", "entropy_collapsed", "kl_growing", "length_hacking", "trend"]
