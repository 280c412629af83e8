"""``TorchCompile`` compiles the decoder in place: same losses as eager, checkpoint keys unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlft.callbacks import TorchCompile
from rlft.data import PreferenceDataModule
from rlft.methods import SFT
from rlft.models import LoraSettings


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def _fit(tmp_path, callbacks) -> tuple[SFT, list[float]]:
    L.seed_everything(0)
    module = SFT(model="tiny-llama", lora=LoraSettings(r=4, dropout=0.0), output_dir=str(tmp_path / "out"))
    data = PreferenceDataModule(path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=64, val_fraction=0.0,
                                shuffle=False, limit=8)  # fmt: skip
    losses = _Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[losses, *callbacks])  # fmt: skip
    trainer.fit(module, data)
    return module, losses.values


@pytest.mark.slow
def test_compiled_sft_matches_eager(tmp_path):
    eager, eager_losses = _fit(tmp_path / "eager", [])
    compiled, compiled_losses = _fit(tmp_path / "compiled", [TorchCompile()])
    body = compiled.model.get_base_model().model
    assert body._compiled_call_impl is not None  # compiled in place
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert torch.isfinite(torch.tensor(compiled_losses)).all()
