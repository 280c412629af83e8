"""Keep the logged curve whole across a kill: what a step did after its checkpoint is redone after a resume.

Lightning writes a step's checkpoint (``ModelCheckpoint.on_train_batch_end``) before it hands that step's metrics
to the loggers and before the validation due at that step. A process killed in between resumes *after* that step,
so its ``train/loss`` would never be logged and that validation never run. This callback stores the step's metrics
and whether validation was due in the checkpoint; after a resume it logs the metrics again and runs the validation
(from the restored random state, so sampled validation rollouts match). A process that did get to log them logs
the same values twice at the same step, which loggers merge.
"""

from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.trainer.states import RunningStage

KEY = "rlft_pending_log"


class ResumeLogContinuity(L.Callback):
    """Stores the current step's pending metrics in every checkpoint and re-logs them after a resume."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.stage != RunningStage.TRAINING:
            return
        _repair_epoch_progress(checkpoint)
        if not trainer.loggers:
            return
        connector = trainer._logger_connector  # the only place the not-yet-logged step metrics exist
        if not connector.should_update_logs:
            return
        loop = trainer.fit_loop.epoch_loop
        metrics = convert_tensors_to_scalars(connector.metrics["log"])
        fetcher = trainer.fit_loop._data_fetcher
        val_due = bool(fetcher is not None and trainer.enable_validation and loop._should_check_val_fx(fetcher))
        checkpoint[KEY] = {
            "step": int(loop._batches_that_stepped),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "val_due": val_due,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        if not pending:
            return
        for logger in trainer.loggers:
            if pending["metrics"]:
                logger.log_metrics(pending["metrics"], step=pending["step"])
                logger.save()
        if pending.get("val_due"):
            # on_train_start comes before the epoch loop advances its step counter past the restored step, so the
            # validation logs at the step it belonged to
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True


def _repair_epoch_progress(checkpoint: dict) -> None:
    """Count the running epoch as started in the saved loop state.

    After a resume from a checkpoint written on the last batch of an epoch, Lightning (2.6) runs the next epoch
    without counting it as started; a checkpoint written during that epoch then reads as "epoch finished", so a
    second resume would repeat the epoch (same shuffle, wrong data) instead of continuing it.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if not progress:
        return
    for part in ("current", "total"):
        counts = progress.get(part)
        if counts and counts["ready"] == counts["completed"]:
            counts["ready"] = counts["started"] = counts["completed"] + 1
            counts["processed"] = counts["completed"]
