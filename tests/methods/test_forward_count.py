"""No redundant forward passes: count the transformer's forward calls in DPO training steps."""

from __future__ import annotations

import lightning as L
import pytest

from rlft.data import PreferenceDataModule
from rlft.methods import DPO, SFT
from rlft.models import LoraSettings


def _count_forwards(module, data, tmp_path, steps: int = 2) -> int:
    calls = []
    backbone = module.model.get_base_model().model  # the decoder stack every scoring path runs through
    backbone.register_forward_hook(lambda *args: calls.append(1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return len(calls)


PROBE = 3  # the one-off segmented-attention probe (rlft.models.attention): two short sequences apart, then packed


def _pairs(**kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(
        path="rlft/assets/sample_pairs.jsonl", batch_size=4, max_length=96, val_fraction=0.0, limit=8, **kwargs
    )


@pytest.mark.parametrize(("reference", "per_step", "upfront"), [("adapter", 2, 0), ("precomputed", 1, 2)])
def test_dpo_runs_one_policy_forward_and_at_most_one_reference_forward_per_step(tmp_path, reference, per_step, upfront):
    module = DPO(
        model="tiny-llama",
        lora=LoraSettings(r=4, dropout=0.0),
        reference=reference,
        ref_cache_path=str(tmp_path / "ref.pt"),
        output_dir=str(tmp_path / "out"),
    )
    # chosen and rejected share one forward; precomputing scores the 8 pairs once in batches of 8 (eval batch size)
    assert _count_forwards(module, _pairs(eval_batch_size=4), tmp_path) == 2 * per_step + upfront + PROBE


def test_packed_dpo_and_sft_do_one_forward_per_scoring(tmp_path):
    module = DPO(model="tiny-llama", lora=LoraSettings(r=4, dropout=0.0), output_dir=str(tmp_path / "out"))
    # 2 steps x (policy + adapter-off reference), plus the probe
    assert _count_forwards(module, _pairs(packing=True), tmp_path) == 2 * 2 + PROBE
    sft = SFT(model="tiny-llama", lora=LoraSettings(r=4, dropout=0.0), output_dir=str(tmp_path / "sft"))
    data = PreferenceDataModule(path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=96, val_fraction=0.0)
    assert _count_forwards(sft, data, tmp_path, steps=3) == 3
