"""Non-finite loss, gradient or weights stop the run (nothing exported, non-zero exit) or, when asked, skip steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlft.callbacks import NonFiniteError, NonFiniteGuard
from rlft.data import PreferenceDataModule
from rlft.methods import SFT

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


class NaNAtStep(SFT):
    """SFT whose loss becomes NaN at the given optimiser steps (a stand-in for an fp16 overflow)."""

    def __init__(self, *args, bad_steps=(2,), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps = set(bad_steps)

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        if self.trainer.global_step in self.bad_steps:
            loss = loss * float("nan")
        return loss, metrics


def _fit(tmp_path, module, guard):
    data = PreferenceDataModule("rlft/assets/sample_sft.jsonl", batch_size=4, max_length=128, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[guard],
        default_root_dir=tmp_path,
    )
    module.hparams.output_dir = str(tmp_path / "hf_model")
    trainer.fit(module, data)
    return trainer


def test_nan_loss_stops_with_step_rows_and_cause_and_exports_nothing(tmp_path):
    module = NaNAtStep("tiny-llama", lora=LORA, optim={"lr": 1e-3})
    with pytest.raises(NonFiniteError) as error:
        _fit(tmp_path, module, NonFiniteGuard())
    message = str(error.value)
    assert "non-finite loss" in message and "at step 2" in message
    assert "sample_sft.jsonl:" in message  # the rows of the bad batch, file:line
    assert "likely cause" in message and "Nothing was exported" in message
    assert not (tmp_path / "hf_model").exists()


def test_skip_mode_drops_bad_steps_counts_them_and_keeps_weights_finite(tmp_path):
    module = NaNAtStep("tiny-llama", lora=LORA, optim={"lr": 1e-3}, bad_steps=(1,))
    guard = NonFiniteGuard(action="skip")
    trainer = _fit(tmp_path, module, guard)
    assert guard.skips == 1 and trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
    assert (tmp_path / "hf_model" / "adapter_model.safetensors").is_file()


def test_skip_mode_gives_up_after_max_skips(tmp_path):
    module = NaNAtStep("tiny-llama", lora=LORA, optim={"lr": 1e-3}, bad_steps=(0, 1, 2, 3))
    with pytest.raises(NonFiniteError, match="max_skips reached"):
        _fit(tmp_path, module, NonFiniteGuard(action="skip", max_skips=2))


class PoisonWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        next(p for p in pl_module.parameters() if p.requires_grad).data.fill_(float("inf"))


def test_non_finite_weights_are_never_exported(tmp_path):
    module = SFT("tiny-llama", lora=LORA, optim={"lr": 1e-3})
    data = PreferenceDataModule("rlft/assets/sample_sft.jsonl", batch_size=4, max_length=128, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[PoisonWeights(), NonFiniteGuard()],
    )
    module.hparams.output_dir = str(tmp_path / "hf_model")
    with pytest.raises(NonFiniteError, match="non-finite weight"):
        trainer.fit(module, data)
    assert not (tmp_path / "hf_model").exists()


def test_bad_guard_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="stop.*skip"):
        NonFiniteGuard(action="ignore")
    monkeypatch.setenv("RLFT_NONFINITE", "skip")
    assert NonFiniteGuard().action == "skip"
