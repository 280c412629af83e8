"""Evaluation callbacks inside a real (tiny) SFT fit: they run on schedule, log, and leave training untouched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from rlft.callbacks import EvaluationCallback, PerplexityCallback, SampleGenerationsCallback
from rlft.eval.perplexity import perplexity

SAMPLE = Path(__file__).resolve().parents[2] / "rlft" / "assets" / "sample_sft.jsonl"


class _TrainingModeProbe(EvaluationCallback):
    """Records the model's mode and grad state seen during evaluation, and the mode around it."""

    def evaluate(self, model, tokenizer, pl_module):
        self.seen = (model.training, torch.is_grad_enabled())
        return {"probe": 1.0}


def test_callbacks_run_every_n_steps_and_at_fit_end(tmp_path):
    if not SAMPLE.exists():
        pytest.skip(f"sample data {SAMPLE} not present")
    from rlft.data import PreferenceDataModule
    from rlft.methods import SFT

    L.seed_everything(0)
    module = SFT(model="tiny-llama", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    data = PreferenceDataModule(path=str(SAMPLE), batch_size=4, max_length=128, val_fraction=0.2, limit=16)
    ppl = PerplexityCallback(str(SAMPLE), limit=4, every_n_steps=2)
    samples = SampleGenerationsCallback(["Say hello."], max_new_tokens=5, every_n_steps=3)
    probe = _TrainingModeProbe(every_n_steps=1, at_fit_end=False)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=logger,
        callbacks=[ppl, samples, probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        default_root_dir=tmp_path,  # the export lands in <default_root_dir>/hf_model
    )
    trainer.fit(module, datamodule=data)

    assert [step for step, _ in ppl.history] == [2, 4]  # every 2 steps; fit end at step 4 is not repeated
    assert [step for step, _ in samples.history] == [3, 4]
    assert probe.seen == (False, False) and module.model.training  # evaluated in eval mode, training restored
    # the logged number is the perplexity of the model as trained at the end
    expected = perplexity(module.model, module.tokenizer, ppl.records).perplexity
    assert ppl.history[-1][1]["eval/perplexity"] == pytest.approx(expected, rel=1e-5)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("eval/perplexity")]
    assert [int(row["step"]) for row in logged] == [2, 4]
    rows = [json.loads(line) for line in (Path(logger.log_dir) / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4] and rows[0]["prompt"] == "Say hello."


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        PerplexityCallback.__mro__[1](every_n_steps=-1)
    with pytest.raises(ValueError, match="at least one prompt"):
        SampleGenerationsCallback([])
