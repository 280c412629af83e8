"""PPO: reward placement, KL shaping and controller by hand; unit ratio at start; early stop; learning; CLI resume."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.cli.fit import run_lightning_cli
from rlft.data import PreferenceDataModule
from rlft.methods import PPO
from rlft.methods.ppo import explained_variance
from rlft.models import LoraSettings
from rlft.ops import last_token_scores
from rlft.rl.kl import KLSettings
from rlft.rl.rollout import Rollout

PROMPTS = "rlft/assets/sample_prompts.jsonl"


pytestmark = pytest.mark.usefixtures("single_thread")


class DigitPPO(PPO):
    """A user's own reward through the ``reward`` hook: share of digit characters."""

    def reward(self, prompts, completions, **fields):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def fit(module, tmp_path, steps: int, batch_size: int = 4) -> pd.DataFrame:
    data = PreferenceDataModule(path=PROMPTS, batch_size=batch_size, val_fraction=0.0, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv").dropna(subset=["train/reward"])


def test_score_lands_on_the_last_real_response_token():
    # right-padded responses of lengths 3, 1 and 4: the bug of reading the reward at a pad position cannot happen
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    placed = last_token_scores(torch.tensor([2.0, -1.0, 0.5]), mask)
    assert placed.tolist() == [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0.5]]


def test_kl_shaped_token_rewards_by_hand():
    module = PPO(model="tiny-llama", kl={"coef": 0.5, "estimator": "k1"})
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rollout = Rollout(
        torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 3), mask, ["", ""], ["", ""], logps=logps, ref_logps=ref
    )
    rewards = module.token_rewards(rollout, torch.tensor([1.0, 2.0]))
    kl = rollout.kl  # the per-token KL of the rollout, kept on it for the statistics
    # k1 = logp - ref_logp per token; reward = score on the last token - coef * k1
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 0.5, 1.0], [-0.5, 2.0, 0.0]]


def test_adaptive_kl_controller_by_hand():
    fixed = KLSettings(coef=0.1)
    assert fixed.update(0.1, observed_kl=50.0, sequences=8) == 0.1
    adaptive = KLSettings(coef=0.1, target=4.0, horizon=100)
    assert adaptive.update(0.1, observed_kl=4.4, sequences=10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    # the proportional error is clipped to +-0.2
    assert adaptive.update(0.1, observed_kl=40.0, sequences=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive.update(0.1, observed_kl=0.0, sequences=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_first_updates_have_unit_ratio_zero_kl_and_a_learning_critic(tmp_path):
    L.seed_everything(0)
    module = DigitPPO(
        model="tiny-llama",
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        optim={"lr": 0.0},
        epochs=2,
        minibatch_size=2,
        sampling={"max_new_tokens": 5},
        kl={"coef": 0.1},
    )
    metrics = fit(module, tmp_path, steps=4)
    assert metrics["train/approx_kl"].abs().max() < 1e-10 and metrics["train/clipfrac"].max() == 0.0
    assert metrics["train/kl"].abs().max() < 1e-5  # fresh adapter: the policy is the adapter-disabled reference
    for name in (
        "train/entropy",
        "train/value_loss",
        "train/explained_variance",
        "train/response_length",
        "train/policy_loss",
        "train/kl_coef",
        "train/tokens_per_sec",
    ):
        assert metrics[name].notna().all(), name


class RandomScorePPO(PPO):
    """Scores that differ between responses on every rollout, so every update moves the policy."""

    def reward(self, prompts, completions, **fields):
        return torch.rand(len(completions)).tolist()


def test_inner_epochs_stop_early_past_the_approx_kl_target(tmp_path):
    L.seed_everything(0)
    # (with the digit reward, a rollout without digits has zero advantages, no update and approx-KL 0 throughout)
    module = RandomScorePPO(
        model="tiny-llama",
        lora=None,
        optim={"lr": 5e-2},
        epochs=4,
        target_approx_kl=1e-9,
        sampling={"max_new_tokens": 5},
        kl={"coef": 0.0},
    )
    metrics = fit(module, tmp_path, steps=2)
    # epoch 1 starts at the rollout policy (approx-KL 0); after its update epoch 2 is past the target: stop
    assert metrics["train/epochs"].tolist() == [2.0]


def test_ppo_learns_a_verifiable_reward(tmp_path):
    L.seed_everything(0)
    module = DigitPPO(
        model="tiny-llama",
        lora=None,
        optim={"lr": 1e-2, "scheduler": "constant_with_warmup"},
        epochs=2,
        vf_coef=0.5,
        sampling={"max_new_tokens": 8},
        kl={"coef": 0.0},
        output_dir=str(tmp_path / "hf"),
    )
    # 70 steps: at 40 the reward had reached 0.36-0.97 depending on the sampling seed; by 70 it is ~1 for each
    metrics = fit(module, tmp_path, steps=70, batch_size=8)
    reward = metrics["train/reward"].to_numpy()
    print("PPO tiny reward curve:", [round(float(r), 3) for r in reward])
    start, end = reward[:3].mean(), reward[-3:].mean()
    assert start < 0.1 and end > 0.8, f"reward did not rise: {start:.3f} -> {end:.3f}"


def test_separate_critic_adaptive_kl_and_cli_resume(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rlft"])
    out = tmp_path / "run"
    common = [
        "-c",
        "configs/ppo/tiny.yaml",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--model.output_dir",
        str(out / "hf"),
        "--model.critic",
        "tiny-llama",
        "--model.kl.target",
        "1.0",
        "--model.epochs",
        "1",
        "--model.minibatch_size",
        "4",
        "--trainer.callbacks+=ModelCheckpoint",
        "--model.gradient_checkpointing",
        "true",
        "--trainer.callbacks.every_n_train_steps",
        "1",
    ]
    cli = run_lightning_cli(["fit", *common, "--trainer.max_steps", "2"])
    module = cli.model
    assert module.critic is not None and module.kl_coef != 0.05  # the controller moved the coefficient
    assert module.critic.get_base_model().is_gradient_checkpointing  # the critic follows the run's settings
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["rlft_kl_coef"] == pytest.approx(module.kl_coef)
    assert any(k.startswith("value_head.") for k in saved["state_dict"]) and any(
        "critic" in k for k in saved["state_dict"]
    )
    resumed = run_lightning_cli(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3
    assert (out / "hf" / "adapter_model.safetensors").exists()


def test_mlp_value_head_learns_like_the_linear_one(tmp_path):
    L.seed_everything(0)
    module = DigitPPO(
        model="tiny-llama",
        lora=None,
        optim={"lr": 1e-2},
        epochs=2,
        vf_coef=0.5,
        value_head="mlp",
        sampling={"max_new_tokens": 6},
        kl={"coef": 0.0},
    )
    metrics = fit(module, tmp_path, steps=6)
    head = module.value_head
    assert isinstance(head, torch.nn.Sequential) and len(head) == 3  # hidden -> hidden -> 1
    assert metrics["train/value_loss"].notna().all() and (metrics["train/explained_variance"] != 0).any()
    with pytest.raises(ValueError, match="unknown value head 'deep'"):
        PPO(model="tiny-llama", value_head="deep")
