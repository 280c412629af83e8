"""What LightningCLI's config callback adds for experiment trackers (W&B): the resolved config, the rlft version
and, when the logger was asked to ``log_model``, the final Hugging Face folder (adapter) as a model artifact."""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback

log = logging.getLogger(__name__)


def rlft_version() -> str:
    # read from the installed metadata: importing the root package from here would point the layers upward
    try:
        return metadata.version("rlft")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _wandb_loggers(trainer) -> list:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always ships the class; wandb itself may be missing
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class TrackedConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` like Lightning's callback, and logs config + version + final adapter to W&B runs."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in loggers:
            logger.experiment.config.update({"rlft_version": rlft_version(), "config": config}, allow_val_change=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # teardown runs after the module's on_fit_end (which saves the HF folder) and before loggers finalize
        if stage != "fit" or not trainer.is_global_zero or trainer.interrupted:
            return
        export_dir = getattr(pl_module, "export_dir", None)
        folder = Path(export_dir()) if callable(export_dir) else None
        for logger in _wandb_loggers(trainer):
            if not logger._log_model or folder is None or not folder.is_dir():
                continue
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(f"hf-model-{run.id}", type="model", metadata={"rlft_version": rlft_version()})
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=["latest", "final"])
            log.info("logged %s to W&B as artifact hf-model-%s", folder, run.id)
