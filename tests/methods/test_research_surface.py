"""The research surface: published variants as tiny subclasses (tests/methods/my_pkg/variants.py) and a DPO loss
from YAML, run through `rlft fit --model ...` with validation (sanity check included) and no library edit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict

from rlft.models.scoring import PairLogps

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "methods"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
sys.path.insert(0, str(REPO / "tests" / "methods"))

from my_pkg.variants import DPOPositive, OverlongGRPO  # noqa: E402


def test_dapo_overlong_grpo_and_a_reward_of_token_ids_through_the_cli(cli_fit):
    rows = cli_fit(
        "grpo",
        "--model",
        "my_pkg.variants.OverlongGRPO",
        "--model.rewards",
        '[{source: "my_pkg.variants:completion_tokens"}]',
    )
    reward, score = rows.column("train/reward"), rows.column("train/score")
    lengths = rows.column("train/response_length")
    # the shaped score is the reward plus the overlong penalty of the mean length's regime (max 16 new tokens)
    assert len(reward) == len(score) == 3 and rows.column("val/reward")
    assert all(s <= r + 1e-6 for r, s in zip(reward, score))
    assert any(r - s > 1e-3 for r, s in zip(reward, score)) or max(lengths) <= 10


def test_overlong_penalty_matches_the_paper():
    module = OverlongGRPO.__new__(OverlongGRPO)  # the hook is pure: no model needed
    module._hparams = AttributeDict(missing_eos_penalty=None)

    class Rollout:
        response_lengths = torch.tensor([4, 10, 13, 16, 30])
        finished = torch.ones(5, dtype=torch.bool)

    shaped = OverlongGRPO.shape_scores(module, Rollout(), torch.zeros(5))
    torch.testing.assert_close(shaped, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_dpo_positive_subclass_through_the_cli_and_by_hand(cli_fit):
    rows = cli_fit("dpo", "--model", "my_pkg.variants.DPOPositive")
    assert rows.column("train/loss")[0] == pytest.approx(0.6931, abs=1e-4) and rows.column("val/loss")
    policy = PairLogps(
        chosen=torch.tensor([-5.0]),
        rejected=torch.tensor([-6.0]),
        chosen_tokens=torch.ones(1),
        rejected_tokens=torch.ones(1),
    )
    module = DPOPositive.__new__(DPOPositive)
    module._hparams = AttributeDict(beta=0.1)
    reference = PairLogps(
        chosen=torch.tensor([-4.0]),
        rejected=torch.tensor([-6.0]),
        chosen_tokens=torch.ones(1),
        rejected_tokens=torch.ones(1),
    )
    output = DPOPositive.preference_loss(module, policy, reference, {})
    losses = output.losses
    assert output.stats["chosen_rewards"].item() == pytest.approx(0.1 * -1.0)
    # margin (-1) - 0 - 50 * max(0, -4 - -5) = -51; loss = -log sigmoid(0.1 * -51)
    assert float(losses) == pytest.approx(-float(torch.nn.functional.logsigmoid(torch.tensor(-5.1))), rel=1e-6)


def test_gspo_policy_loss_subclass_through_the_cli(cli_fit):
    rows = cli_fit("grpo", "--model", "my_pkg.online_variants.GSPOGRPO")
    assert len(rows.column("train/loss")) == 3 and rows.column("val/reward")
    assert all(c == 0.0 for c in rows.column("train/clipfrac"))  # one update per rollout: the ratio is 1


def test_dpo_loss_type_from_yaml_as_module_function(cli_fit):
    rows = cli_fit("dpo", "--model.init_args.loss_type", "my_pkg.losses:squared")
    # at step 0 policy == reference, so logits are 0 and (0.1 * 0 - 1)^2 = 1
    assert rows.column("train/loss")[0] == pytest.approx(1.0, abs=1e-5)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlft",
            "fit",
            "-c",
            str(REPO / "configs/dpo/tiny.yaml"),
            "--model.init_args.loss_type",
            "my_pkg.losses:cubed",
            "--trainer.max_steps",
            "1",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "has no attribute 'cubed'" in bad.stderr


def test_every_named_choice_takes_module_function():
    from rlft.methods import GRPO, ReinforcePP
    from rlft.ops import group_advantages, kl_estimate

    rewards = torch.tensor([1.0, 2.0, 7.0, 0.0, 0.0, 3.0])
    advantages = group_advantages(rewards, 3, baseline="my_pkg.variants:median_baseline", scale="none")
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 5.0, 0.0, 0.0, 3.0]))
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "my_pkg.variants:squared_log_ratio"), torch.tensor([0.25, 1.0]))
    rewards = [{"source": "length", "options": {"target": 4}}]
    GRPO(model="tiny-llama", rewards=rewards, baseline="my_pkg.variants:median_baseline", scale="none")
    ReinforcePP(model="tiny-llama", rewards=rewards, kl={"estimator": "my_pkg.variants:squared_log_ratio"})
    with pytest.raises(ValueError, match=r"unknown baseline 'medain'; choose one of \['leave_one_out', 'mean'\]"):
        GRPO(model="tiny-llama", rewards=rewards, baseline="medain")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ReinforcePP(model="tiny-llama", rewards=rewards, kl={"estimator": "my_pkg.variants:nope"})
