"""The research surface's published variants that need no library edit, each through `rlft fit` with validation:
Dr. GRPO and RLOO as YAML lines, SimPO with a step-scheduled gamma as a 10-line subclass, a margin reward model from
a per-row `margin` in the data (no code), SGD with a cosine schedule from YAML. (GSPO, online DPO with a judge, a
rollout-length callback and a JSON reward: tests/methods/test_online_surface.py; DAPO overlong, DPO-Positive, robust
DPO as module:function: test_research_surface.py; KTO: test_kto.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "variant",
    [
        ["--model.init_args.scale", "none", "--model.init_args.loss_aggregation", "dr_grpo"],  # Dr. GRPO
        ["--model.init_args.baseline", "leave_one_out", "--model.init_args.scale", "none"],  # RLOO
    ],
    ids=["dr_grpo", "rloo"],
)
def test_grpo_variants_are_yaml_lines(cli_fit, variant):
    rows = cli_fit("grpo", *variant, steps=2)
    assert len(rows.column("train/policy_loss")) == 2 and rows.column("val/loss") and rows.column("val/reward")


def test_simpo_with_a_step_scheduled_gamma(cli_fit):
    rows = cli_fit("simpo", "--model", "my_pkg.variants.ScheduledSimPO", "--model.init_args.gamma", "2.0", steps=4)
    losses = rows.column("train/loss")
    # step 0: gamma 0 and policy == start, the length-averaged margin starts near 0: the loss is near log 2; by
    # then gamma has grown to 1.5 and the loss with it (log(1 + e^(margin_gap)))
    assert losses[0] == pytest.approx(math.log(2), abs=0.05) and losses[3] > losses[0] + 0.3
    assert rows.column("val/loss")


def test_a_margin_reward_model_needs_only_the_data(cli_fit, tmp_path):
    rows = [json.loads(line) for line in (REPO / "rlft/assets/sample_pairs.jsonl").read_text().splitlines()]
    data = tmp_path / "pairs_with_margin.jsonl"
    data.write_text("".join(json.dumps({**row, "margin": 1.5}) + "\n" for row in rows))
    logged = cli_fit("rm", "--data.init_args.path", str(data), steps=1)
    # rewards start at exactly 0 (zero head): the first loss is -log sigmoid(0 - 1.5) = softplus(1.5), not log 2
    assert logged.column("train/loss")[0] == pytest.approx(math.log1p(math.exp(1.5)), abs=1e-4)
    assert logged.column("val/loss") and logged.column("val/auroc")


def test_sgd_with_a_cosine_schedule_from_yaml(cli_fit):
    schedule = '{"lr": null, "scheduler": "cosine", "warmup_steps": 0}'  # the optimiser's own lr, decayed
    rows = cli_fit(
        "sft",
        "--model.init_args.optimizer",
        "torch.optim.SGD",
        "--model.init_args.optimizer.lr",
        "0.05",
        "--model.init_args.optim",
        schedule,
        steps=4,
    )
    lrs = rows.column("lr-SGD") or rows.column("lr-SGD/pg1")
    assert lrs and lrs[0] == pytest.approx(0.05) and lrs[-1] < lrs[0]  # the cosine decays the optimiser's own lr
    assert rows.column("val/loss")
