"""The implementation guide's training checkpoints, read back from a stage's logged metrics.

The guide says what a healthy run looks like per method (DPO's loss falls from 0.69 towards 0.4-0.5 while the chosen
log-ratio rises and the rejected one falls; PPO's reward rises with the KL bounded, 10-30 % of tokens clipped, and the
inner epochs stopping once the approx-KL passes the target). :func:`checkpoint_rows` puts each logged metric's start
and end next to that expectation, so a report shows whether a run behaved, not only where it ended.
"""

from __future__ import annotations

import math

# logged metric -> what the guide expects of it; metric names keep one meaning across methods
GUIDE_CHECKPOINTS: dict[str, str] = {
    "train/loss": "falls (DPO: 0.69 -> 0.4-0.5)",
    "val/loss": "falls",
    "val/rewards/accuracy": "DPO: > 0.6 (implicit-reward accuracy)",
    "train/rewards/accuracy": "DPO: > 0.6",
    "train/rewards/chosen": "DPO: rises (chosen log-ratio x beta)",
    "train/rewards/rejected": "DPO: falls",
    "val/accuracy": "RM: > 0.5, rising",
    "train/reward": "rises",
    "val/reward": "rises",
    "train/kl": "bounded (no runaway)",
    "train/clipfrac": "PPO: 0.10-0.30",
    "train/approx_kl": "PPO: epochs stop once past target_approx_kl (0.02)",
    "train/epochs": "PPO: below `epochs` when the approx-KL stop fires",
    "trpo/kl": "TRPO: <= max_kl",
    "trpo/backtracks": "TRPO: few (the quadratic model holds)",
    "trpo/step_fraction": "TRPO: near 1",
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def checkpoint_rows(series: dict[str, list[tuple[float, float]]], *, window: float = 0.1) -> list[dict]:
    """One row per :data:`GUIDE_CHECKPOINTS` metric the stage logged: its start and end (means over the first and
    last ``window`` of the logged points, at least one point each, so one noisy step does not decide), the number of
    points and the guide's expectation."""
    rows = []
    for metric, target in GUIDE_CHECKPOINTS.items():
        points = [value for _, value in sorted(series.get(metric, [])) if math.isfinite(value)]
        if not points:
            continue
        k = max(1, int(len(points) * window))
        rows.append(
            {
                "metric": metric,
                "start": _mean(points[:k]),
                "end": _mean(points[-k:]),
                "points": len(points),
                "target": target,
            }
        )
    return rows


def checkpoint_table(series: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Markdown lines of :func:`checkpoint_rows` (empty when the stage logged none of them)."""
    rows = checkpoint_rows(series)
    if not rows:
        return []
    lines = ["| metric | start | end | points | guide |", "|---|---|---|---|---|"]
    lines += [f"| `{r['metric']}` | {r['start']:.4g} | {r['end']:.4g} | {r['points']} | {r['target']} |" for r in rows]
    return lines + [""]
