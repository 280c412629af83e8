"""``rlft fit|validate|test|predict``: LightningCLI over every rlft method and the shared data module."""

from __future__ import annotations

import logging
import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from rlft.cli.config_logging import TrackedConfigCallback
from rlft.data import PreferenceDataModule
from rlft.methods.base import RLFTModule


class RLFTCLI(LightningCLI):
    """LightningCLI whose checkpoints live in ``<default_root_dir>/checkpoints`` so ``--ckpt_path last`` resumes."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                # a fixed folder (not the logger's versioned one) is what lets a new process find `last.ckpt`
                if callback.dirpath is None:
                    callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
                if callback.save_last is None:
                    callback.save_last = True
        return trainer


def run_lightning_cli(argv: list[str]) -> RLFTCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return RLFTCLI(
        RLFTModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        save_config_callback=TrackedConfigCallback,  # also logs the resolved config (+ final adapter) to W&B
        # from the console, let LightningCLI read sys.argv itself (passing both triggers a warning)
        args=None if argv == sys.argv[1:] else argv,
        auto_configure_optimizers=False,
    )
