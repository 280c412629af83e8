"""A compact progress line for runs without a progress bar (logs, CI, the demo): step, loss, throughput, ETA.

Lightning's bar redraws one terminal line; in a log file or a pipe it is either off or a wall of carriage
returns. :class:`ProgressLine` prints a plain line instead, on rank 0, at most every ``every_seconds`` (and at the
first and last step), plus one line per validation::

    rlft: step 10/40 (25%) | loss 2.314 | 205 tok/s | 0:00:31 elapsed, ETA 0:01:33
    rlft: validation at step 20 | val/loss 2.101

``rlft fit`` adds it to every run; it stays silent while a progress bar is shown.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback

# what a line shows of the logged metrics, when the method logs it (label, format)
TRAIN_FIELDS = {
    "train/loss": ("loss", "{:.4g}"),
    "train/reward": ("reward", "{:.4g}"),
    "train/kl": ("kl", "{:.3g}"),
    "train/tokens_per_sec": ("tok/s", "{:,.0f}"),
}
VAL_PREFIX = "val/"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _number(value) -> float | None:
    try:
        return float(value)  # a NaN shows as nan: the non-finite guard says why
    except (TypeError, ValueError):
        return None


class ProgressLine(Callback):
    """Print ``step N/total | loss | tok/s | elapsed, ETA`` every ``every_seconds`` when no progress bar is shown.

    Args:
        every_seconds: Least time between two lines (the first and the last step always print).
        stream: Where lines go; default ``sys.stderr``.
    """

    def __init__(self, every_seconds: float = 10.0, stream: TextIO | None = None) -> None:
        self.every_seconds = every_seconds
        self.stream = stream
        self._started = 0.0
        self._first_step = 0
        self._last_line = -math.inf

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None

    def _print(self, text: str) -> None:
        print(f"rlft: {text}", file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def total_steps(trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        estimate = trainer.estimated_stepping_batches  # from max_epochs and the loader's length
        return int(estimate) if math.isfinite(estimate) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run's ETA counts only this process's steps
        self._last_line = -math.inf
        if self._active(trainer):
            total = self.total_steps(trainer)
            start = f" from step {trainer.global_step}" if trainer.global_step else ""
            self._print(f"training {total if total is not None else '?'} steps{start}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._active(trainer):
            return
        now, step, total = time.monotonic(), trainer.global_step, self.total_steps(trainer)
        last = total is not None and step >= total
        if now - self._last_line < self.every_seconds and not last and step != self._first_step + 1:
            return
        self._last_line = now
        self._print(" | ".join(self.fields(trainer, step, total, now - self._started)))

    def fields(self, trainer: L.Trainer, step: int, total: int | None, elapsed: float) -> list[str]:
        # an online method's rollout makes several optimiser steps, so the last one may pass max_steps
        parts = [f"step {step}/{total} ({min(100.0, 100 * step / total):.0f}%)" if total else f"step {step}"]
        metrics = trainer.callback_metrics
        for key, (label, fmt) in TRAIN_FIELDS.items():
            value = _number(metrics.get(key))
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}" if label != "tok/s" else f"{fmt.format(value)} {label}")
        timing = f"{_clock(elapsed)} elapsed"
        done = step - self._first_step
        if total and 0 < done and step < total:
            timing += f", ETA {_clock(elapsed / done * (total - step))}"
        parts.append(timing)
        return parts

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._active(trainer):
            return
        first = ("val/loss", "val/reward")  # then the rest by name
        keys = [k for k in trainer.callback_metrics if k.startswith(VAL_PREFIX)]
        keys.sort(key=lambda k: (k not in first, k))
        shown = [f"{key} {value:.4g}" for key in keys if (value := _number(trainer.callback_metrics[key])) is not None][
            :6
        ]
        self._print(" | ".join([f"validation at step {trainer.global_step}", *shown]))
