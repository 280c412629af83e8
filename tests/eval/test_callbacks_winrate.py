"""In-training evaluation against the starting policy (reward-model win rate) and lm-eval tasks, on tiny models."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rlft.callbacks import LMEvalCallback, WinRateCallback

ASSETS = Path(__file__).resolve().parents[2] / "rlft" / "assets"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A tiny exported reward model whose (random) head tells answers apart."""
    from rlft.methods import RewardModel

    torch.manual_seed(0)
    rm = RewardModel("tiny-llama", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for p in rm.model.head.parameters():
            p.normal_(std=0.5)
    return str(rm.export(tmp_path_factory.mktemp("rm") / "hf_model"))


def _fit(callbacks, lr: float, out, steps: int = 2):
    from rlft.data import PreferenceDataModule
    from rlft.methods import SFT

    L.seed_everything(0)
    module = SFT(
        model="tiny-llama",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        optim={"lr": lr, "warmup_steps": 0},
        output_dir=str(out / "hf_model"),
    )
    data = PreferenceDataModule(
        path=str(ASSETS / "sample_sft.jsonl"), batch_size=4, max_length=96, limit=8, val_fraction=0.0
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module


@pytest.mark.slow
def test_unchanged_policy_ties_with_its_start_and_a_trained_one_is_compared(reward_model, tmp_path):
    prompts = str(ASSETS / "sample_prompts.jsonl")
    frozen = WinRateCallback(prompts, reward_model=reward_model, limit=6, max_new_tokens=6, every_n_steps=1)
    _fit([frozen], lr=0.0, out=tmp_path / "a")
    assert [step for step, _ in frozen.history] == [1, 2]
    for _, metrics in frozen.history:  # lr 0: the same answers as the start, every prompt a tie
        assert metrics["eval/win_rate"] == metrics["eval/win_rate_ci_low"] == metrics["eval/win_rate_ci_high"] == 0.5
        assert metrics["eval/reward"] == pytest.approx(metrics["eval/reward_start"])

    moving = WinRateCallback(prompts, reward_model=reward_model, limit=6, max_new_tokens=6, every_n_steps=2)
    module = _fit([moving], lr=5e-2, out=tmp_path / "b", steps=4)
    (_, first), (_, last) = moving.history
    assert first["eval/reward_start"] == last["eval/reward_start"]  # the start's answers are fixed once
    assert last["eval/reward"] != pytest.approx(last["eval/reward_start"])  # the trained policy answers differently
    assert 0.0 <= last["eval/win_rate_ci_low"] <= last["eval/win_rate"] <= last["eval/win_rate_ci_high"] <= 1.0
    assert module.model.training


@pytest.mark.slow
def test_lm_eval_callback_logs_the_task_metrics_of_the_trained_model(tmp_path):
    from rlft.eval.harness import run_lm_eval

    callback = LMEvalCallback(tasks=["rlft_mc_basics"], limit=4, every_n_steps=0, at_fit_end=True)
    module = _fit([callback], lr=1e-2, out=tmp_path)
    ((step, metrics),) = callback.history
    assert step == 2 and "eval/rlft_mc_basics/acc" in metrics
    direct = run_lm_eval(module.model, module.tokenizer, ["rlft_mc_basics"], limit=4)["results"]["rlft_mc_basics"]
    assert metrics["eval/rlft_mc_basics/acc"] == pytest.approx(direct["acc"])


def test_win_rate_callback_needs_a_judge():
    with pytest.raises(ValueError, match="reward_model, a judge_model or a judge_api_base"):
        WinRateCallback(str(ASSETS / "sample_prompts.jsonl"))
