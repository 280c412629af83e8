"""REINFORCE++ on the online core: hand-checked advantages, and a tiny model learns a verifiable reward."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import ReinforcePP
from rlft.rl.rollout import Rollout

pytestmark = pytest.mark.usefixtures("single_thread")


class DigitReinforce(ReinforcePP):
    def reward(self, prompts, completions, **fields):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_advantages_are_kl_penalised_returns_whitened_over_the_batch():
    module = ReinforcePP(model="tiny-llama", kl={"coef": 0.5, "estimator": "k1"})
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    rollout = Rollout.__new__(Rollout)
    rollout.response_mask, rollout.logps, rollout.ref_logps, rollout.kl = mask, logps, ref, None
    advantages = module.advantages(rollout, torch.tensor([1.0, 0.0]))
    kl = rollout.kl
    # k1 KL per token = logp - ref; rewards = -0.5 * KL, plus the score on each sequence's last token
    expected_kl = (logps - ref) * mask
    rewards = -0.5 * expected_kl
    rewards[0, 2] += 1.0
    rewards[1, 1] += 0.0
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    values = returns[mask.bool()]
    whitened = (returns - values.mean()) / (values.var(unbiased=True) + 1e-8).sqrt() * mask
    torch.testing.assert_close(kl, expected_kl.float())
    torch.testing.assert_close(advantages, whitened)


def test_reinforce_pp_learns_a_verifiable_reward(tmp_path):
    L.seed_everything(0)
    module = DigitReinforce(
        model="tiny-llama",
        lora=None,
        optim={"lr": 1e-2, "scheduler": "constant_with_warmup"},
        sampling={"max_new_tokens": 8, "temperature": 1.0},
        kl={"coef": 0.0},
        output_dir=str(tmp_path / "hf"),
    )
    data = PreferenceDataModule(path="rlft/assets/sample_prompts.jsonl", batch_size=8, val_fraction=0.0, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=45,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    reward = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")["train/reward"].dropna().to_numpy()
    print("REINFORCE++ tiny reward curve:", [round(float(r), 3) for r in reward])
    # 45 steps: at 25 the reward had risen by 0.2-0.9 depending on the sampling seed; by 45 it is ~1 for seeds 0-2
    assert len(reward) == 45
    assert reward[-3:].mean() > reward[:3].mean() + 0.3, f"{reward[:3].mean():.3f} -> {reward[-3:].mean():.3f}"
    assert (tmp_path / "hf" / "model.safetensors").exists()
