"""Optuna's Lightning pruning callback, reporting at the global step.

``optuna_integration.PyTorchLightningPruningCallback`` reports at ``current_epoch``; rlft configs validate every
``val_check_interval`` *steps*, often several times in one epoch, and Optuna keeps only the first value reported
for a step, so a trial that diverged after its first validation would never be pruned. In one process this
subclass reports at ``trainer.global_step`` instead; under DDP it defers to the parent (which syncs the decision
through the RDB storage).
"""

from __future__ import annotations

import math

import optuna
from optuna_integration import PyTorchLightningPruningCallback

__all__ = ["StepPruningCallback"]


class StepPruningCallback(PyTorchLightningPruningCallback):
    """Report ``monitor`` to the trial after every validation and raise ``TrialPruned`` when the pruner says so.

    A non-finite value (a diverged run) is pruned at once; the validation at ``max_steps`` never prunes, since
    the trial has nothing left to save.
    """

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.is_ddp_backend:
            return super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"pruning metric {self.monitor!r} was not logged at validation; logged: "
                f"{', '.join(sorted(trainer.callback_metrics)) or 'nothing'} (--pruner none tunes on metrics that "
                "validation does not log)"
            )
        value = float(value)
        step = trainer.global_step
        self._trial.report(value, step=step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={value} (diverged)")
        # a trial whose training is over completes with its value: pruning it now would save nothing
        finished = 0 < trainer.max_steps <= step
        if not finished and self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={value:.6g}")
