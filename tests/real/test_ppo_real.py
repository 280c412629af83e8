"""Real model: PPO with LoRA and a value head on SmolLM2-135M-Instruct meets the implementation guide's checkpoints
on a rule reward (CPU): the reward rises, the KL to the reference stays bounded, a share of tokens is clipped (the
guide's 10-30 % band is printed; a bounded range is asserted), and the approx-KL early stop ends epochs.

Measured here (8 rollouts of 8 prompts, one thread, 140 s): score -0.12 -> 0.92, KL at most 0.46, clip fraction
0.12, every rollout's epochs cut at 2 of 4 by the 0.02 approx-KL target."""

from __future__ import annotations

import os
import time

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import PPO

pytestmark = pytest.mark.real

ROLLOUTS = int(os.environ.get("RLFT_PPO_REAL_ROLLOUTS", "8"))
EPOCHS = 4  # the guide's inner loop; the approx-KL stop cuts it
TARGET_APPROX_KL = 0.02  # the guide's threshold


def test_smollm2_ppo_meets_the_guides_checkpoints_on_a_rule_reward(smollm2, tmp_path):
    L.seed_everything(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RLFT_RL_REAL_THREADS", "1")))  # as the GRPO real test: see there
    try:
        module = PPO(
            model=smollm2,
            lora={"r": 16, "alpha": 32, "dropout": 0.0},
            optim={"lr": 5e-4, "scheduler": "constant_with_warmup"},
            # the GRPO real test's brevity rule: full reward up to 20 characters, -1 for a reply not ended in 16 tokens
            rewards=[{"source": "length", "options": {"target": 20, "unit": "chars", "mode": "at_most"}}],
            missing_eos_penalty=1.0,
            sampling={"max_new_tokens": 16, "temperature": 0.8},
            kl={"coef": 0.05},
            epochs=EPOCHS,
            minibatch_size=4,
            target_approx_kl=TARGET_APPROX_KL,
            output_dir=str(tmp_path / "hf"),
        )
        data = PreferenceDataModule(path="rlft/assets/sample_prompts.jsonl", batch_size=8, val_fraction=0.0, seed=0)
        trainer = L.Trainer(
            accelerator="cpu",
            # ROLLOUTS prompt batches, however many updates each makes (the approx-KL stop cuts some)
            max_epochs=1,
            limit_train_batches=ROLLOUTS,
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
    columns = ["train/score", "train/kl", "train/clipfrac", "train/approx_kl", "train/epochs", "train/stop_rate"]
    print(
        f"\nSmolLM2 PPO, {len(metrics)} rollouts in {elapsed:.0f} s\n{metrics[columns].round(4).to_string(index=False)}"
    )
    score = metrics["train/score"].to_numpy()
    start, end = score[:2].mean(), score[-2:].mean()
    clipfrac = metrics["train/clipfrac"].mean()
    stopped = int((metrics["train/epochs"] < EPOCHS).sum())
    print(f"score {start:.3f} -> {end:.3f}; clip fraction {clipfrac:.3f} (guide: 0.10-0.30); {stopped} early stops")
    assert end > start + 0.1, f"mean reward did not rise: {start:.3f} -> {end:.3f}"
    assert metrics["train/kl"].max() < 1.0, "KL to the reference ran away"
    assert 0.0 < clipfrac < 0.5, "no token clipped (the policy did not move) or most clipped (steps far too large)"
    assert stopped >= 1, "the approx-KL stop never cut the inner epochs"
    assert (tmp_path / "hf" / "adapter_model.safetensors").exists()
