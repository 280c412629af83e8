"""The online core's seams, driven through `rlft fit` as a researcher would: one policy loss on two estimators,
online DPO with a judge as one override, a callback that sees each rollout, a reward that knows the stage and
reports its own metrics, validation that computes the training loss, and micro-batching equal to the whole batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import GRPO, PPO, ReinforcePP

PROMPTS = "rlft/assets/sample_prompts.jsonl"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("method", "cls"), [("grpo", "GSPOGRPO"), ("reinforce_pp", "GSPOReinforce")])
def test_one_gspo_policy_loss_runs_unchanged_on_grpo_and_reinforce_pp(cli_fit, method, cls):
    rows = cli_fit(method, "--model", f"my_pkg.online_variants.{cls}")
    assert len(rows.column("train/policy_loss")) == 3 and rows.column("val/loss")
    assert all(c == 0.0 for c in rows.column("train/clipfrac"))  # one update per rollout: the ratio is 1


def test_online_dpo_with_a_judge_and_a_callback_that_sees_the_rollouts(cli_fit):
    rows = cli_fit(
        "grpo",
        "--model",
        "my_pkg.online_variants.GroupDPO",
        "--model.kl.coef",
        "0.0",
        "--trainer.callbacks+=my_pkg.online_variants.RolloutLengthLogger",
    )
    losses, longest = rows.column("train/loss"), rows.column("train/longest_response")
    assert len(losses) == 3 and len(longest) == 3 and max(longest) <= 16
    # the reference is the initial policy: every pair's DPO loss starts at log 2 (or 0 for a tied group)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) or losses[0] == 0.0
    assert max(longest) >= max(rows.column("train/response_length"))


def test_a_reward_knows_the_stage_and_its_metrics_are_logged(cli_fit):
    rows = cli_fit("grpo", "--model.rewards", '[{source: "my_pkg.online_variants:json_answer"}]')
    assert rows.column("train/reward/json_answer/is_validation") == [0.0, 0.0, 0.0]
    assert rows.column("val/reward/json_answer/is_validation") == [1.0]
    assert rows.column("train/reward/json_answer/valid_json") and rows.column("val/loss")


class Recorder(L.Callback):
    def __init__(self):
        self.rollouts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rollouts.append(outputs["rollout"])


def _one_update(method, tmp_path: Path, micro_batch_size: int | None, **settings):
    # eps 1: an update linear in the gradient (Adam's first step is lr * sign(g) where g ~ 0, which rounding flips)
    L.seed_everything(0)
    extra = {"group_size": 4} if method is GRPO else {}
    module = method(
        model="tiny-llama",
        lora=None,
        optim={"lr": 1e-2, "eps": 1.0},
        sampling={"max_new_tokens": 6},
        rewards=[{"source": "length", "options": {"target": 12, "unit": "chars"}}],
        micro_batch_size=micro_batch_size,
        output_dir=str(tmp_path / f"out{micro_batch_size}"),
        **extra,
        **settings,
    )
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    data = PreferenceDataModule(path=PROMPTS, batch_size=2, val_fraction=0.0, seed=0)
    module.build_network()
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, data)
    weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any(not torch.equal(initial[n], v) for n, v in weights.items()), "the update moved nothing"
    return weights, recorder.rollouts[0]


@pytest.mark.parametrize(
    ("method", "settings"), [(GRPO, {}), (GRPO, {"loss_aggregation": "token"}), (PPO, {"epochs": 1}), (ReinforcePP, {})]
)
def test_micro_batches_accumulate_to_the_whole_minibatch_update(tmp_path, method, settings):
    whole, rollout = _one_update(method, tmp_path, None, **settings)
    accumulated, same = _one_update(method, tmp_path, 1, **settings)
    assert torch.equal(rollout.response_ids, same.response_ids)  # the same samples
    assert rollout.row_ids.tolist() == list(range(len(rollout)))
    for name, value in whole.items():  # equal to fp32 reduction order
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6, msg=name)
