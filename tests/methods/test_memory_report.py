"""``rlft.callbacks.MemoryReport``: what scripts/distributed_memory.py reads, written by a real (tiny) run."""

from __future__ import annotations

import json

import lightning as L

from rlft.callbacks import MemoryReport
from rlft.data import PreferenceDataModule
from rlft.methods import SFT


def test_memory_report_writes_each_ranks_numbers(tmp_path):
    module = SFT("tiny-llama", lora={"r": 4, "alpha": 8, "dropout": 0.0}, output_dir=str(tmp_path / "hf_model"))
    data = PreferenceDataModule("rlft/assets/sample_sft.jsonl", batch_size=4, max_length=96, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[MemoryReport(after_steps=2)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    numbers = json.loads((tmp_path / "memory" / "rank0.json").read_text())
    for key in ("rss_mb_after_setup", "anon_mb_after_setup", "rss_mb_training", "anon_mb_training", "peak_rss_mb"):
        assert numbers[key] > 50, (key, numbers)  # a process holding torch and a model: tens of MB at least
    # the anonymous part is a part of the resident set, and nothing is resident above the peak
    assert numbers["anon_mb_after_setup"] <= numbers["rss_mb_after_setup"] <= numbers["peak_rss_mb"]
    assert numbers["anon_mb_training"] <= numbers["rss_mb_training"] <= numbers["peak_rss_mb"]
