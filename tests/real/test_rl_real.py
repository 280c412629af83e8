"""Real model: GRPO with LoRA on SmolLM2-135M-Instruct learns a rule-based brevity reward with bounded KL (CPU)."""

from __future__ import annotations

import os
import time

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import GRPO
from rlft.models import LoraSettings

pytestmark = pytest.mark.real

STEPS = int(os.environ.get("RLFT_RL_REAL_STEPS", "10"))


def test_smollm2_grpo_raises_a_rule_based_reward_with_bounded_kl(smollm2, tmp_path):
    L.seed_everything(0)
    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine more threads spin against each other and run several times slower
    torch.set_num_threads(int(os.environ.get("RLFT_RL_REAL_THREADS", "1")))
    try:
        module = GRPO(
            model=smollm2,
            lora=LoraSettings(r=16, alpha=32, dropout=0.0),
            optim={"lr": 5e-4, "scheduler": "constant_with_warmup"},
            # brevity (a rule, no model): full reward up to 20 characters, 20 / characters above, and -1 for a reply
            # that has not ended after 16 tokens; the policy must learn to answer briefly and end its turn
            rewards=[{"source": "length", "options": {"target": 20, "unit": "chars", "mode": "at_most"}}],
            missing_eos_penalty=1.0,
            sampling={"max_new_tokens": 16, "temperature": 0.8},
            group_size=4,
            kl={"coef": 0.1},
            output_dir=str(tmp_path / "hf"),
        )
        data = PreferenceDataModule(path="rlft/assets/sample_prompts.jsonl", batch_size=2, val_fraction=0.0, seed=0)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=STEPS,
            logger=L.pytorch.loggers.CSVLogger(tmp_path),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        started = time.perf_counter()
        trainer.fit(module, data)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    metrics = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv").dropna(subset=["train/reward"])
    columns = [
        "train/score",
        "train/reward",
        "train/stop_rate",
        "train/kl",
        "train/response_length",
        "train/rollout_tokens_per_sec",
        "train/step_seconds",
    ]
    print(f"\nSmolLM2 GRPO, {STEPS} steps in {elapsed:.0f} s\n{metrics[columns].round(4).to_string(index=False)}")
    reward = metrics["train/score"].to_numpy()
    start, end = reward[:2].mean(), reward[-2:].mean()
    assert end > start + 0.1, f"mean reward did not rise: {start:.3f} -> {end:.3f}"
    assert metrics["train/kl"].max() < 1.0, "KL to the reference ran away"
    assert (tmp_path / "hf" / "adapter_model.safetensors").exists()
