"""``TorchCompile`` compiles the decoder in place: same losses as eager, checkpoint keys unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlft.callbacks import TorchCompile
from rlft.data import PreferenceDataModule
from rlft.methods import SFT
from rlft.models import LoraSettings


def _fit(fit_losses, tmp_path, callbacks) -> tuple[SFT, list[float]]:
    L.seed_everything(0)
    module = SFT(model="tiny-llama", lora=LoraSettings(r=4, dropout=0.0), output_dir=str(tmp_path / "out"))
    data = PreferenceDataModule(
        path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=64, val_fraction=0.0, shuffle=False, limit=8
    )
    return module, fit_losses(module, data, steps=2, callbacks=callbacks)


@pytest.mark.slow
def test_compiled_sft_matches_eager(tmp_path, fit_losses):
    eager, eager_losses = _fit(fit_losses, tmp_path / "eager", [])
    compiled, compiled_losses = _fit(fit_losses, tmp_path / "compiled", [TorchCompile()])
    body = compiled.model.get_base_model().model
    assert body._compiled_call_impl is not None  # compiled in place
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert len(compiled_losses) == 2
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert torch.isfinite(torch.tensor(compiled_losses)).all()
