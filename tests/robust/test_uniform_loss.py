"""A finite but dead run: LoRA SFT at a huge learning rate freezes at the uniform loss log(V) and must not exit 0
silently. The guard warns once with what to try and, with ``action: stop``, stops the run."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest

from rlft.callbacks import NonFiniteGuard
from rlft.callbacks.guard import UniformLossError
from rlft.data import PreferenceDataModule
from rlft.methods import SFT

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, lr: float, guard: NonFiniteGuard, steps: int) -> tuple[SFT, LossLog, L.Trainer]:
    module = SFT("tiny-llama", lora=LORA, optim={"lr": lr})
    module.hparams.output_dir = str(tmp_path / "hf_model")
    data = PreferenceDataModule("rlft/assets/sample_sft.jsonl", batch_size=4, max_length=128, val_fraction=0.0)
    losses = LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[guard, losses],
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(module, data)
    finally:
        module.losses = losses
    return module, losses, trainer


def test_huge_learning_rate_frozen_at_uniform_loss_stops_the_run(tmp_path):
    guard = NonFiniteGuard(uniform_after_step=2, uniform_steps=4)
    with pytest.raises(UniformLossError) as error:
        _fit(tmp_path, 1e6, guard, steps=30)
    message = str(error.value)
    assert "log(vocabulary size 512)" in message and f"{math.log(512):.4f}" in message
    assert "lower optim.lr" in message and "(optim.lr 1e+06)" in message
    assert not (tmp_path / "hf_model").exists()  # stopped before the export


def test_skip_action_only_warns_once_and_finishes(tmp_path, caplog):
    guard = NonFiniteGuard(action="skip", uniform_after_step=2, uniform_steps=4)
    with caplog.at_level(logging.WARNING, logger="rlft.callbacks.guard"):
        _, _, trainer = _fit(tmp_path, 1e6, guard, steps=14)
    warnings = [r for r in caplog.records if "uniform distribution" in r.getMessage()]
    assert len(warnings) == 1 and guard.uniform_warned and trainer.global_step == 14


def test_healthy_run_that_starts_near_uniform_loss_is_not_flagged(tmp_path):
    # a random-init tiny model starts at ~log(V) and learns slowly: batches scatter by more than the tolerance
    guard = NonFiniteGuard(uniform_after_step=0, uniform_steps=5)
    _, losses, trainer = _fit(tmp_path, 1e-3, guard, steps=30)
    assert not guard.uniform_warned and trainer.global_step == 30
    assert min(abs(x - math.log(512)) for x in losses.losses) < 0.05  # it did start near log(V)
