"""The research surface's published variants that need no library edit, each through `rlft fit` with validation:
Dr. GRPO and RLOO as YAML lines, SimPO with a step-scheduled gamma as a 10-line subclass, a margin reward model from
a per-row `margin` in the data (no code), SGD with a cosine schedule from YAML. (GSPO, online DPO with a judge, a
rollout-length callback and a JSON reward: tests/methods/test_online_surface.py; DAPO overlong, DPO-Positive, robust
DPO as module:function: test_research_surface.py; KTO: test_kto.py.)"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "methods"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("single_thread")


def _fit(tmp_path: Path, method: str, *args: str, steps: int = 4) -> list[dict]:
    config = (REPO / "configs" / method / "tiny.yaml").read_text().replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (tmp_path / "config.yaml").write_text(config)
    cmd = [sys.executable, "-m", "rlft", "fit", "-c", str(tmp_path / "config.yaml"), "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
           "--model.init_args.output_dir", str(tmp_path / "hf"), *args]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.mark.parametrize("variant", [
    ["--model.init_args.scale", "none", "--model.init_args.loss_aggregation", "dr_grpo"],  # Dr. GRPO
    ["--model.init_args.baseline", "leave_one_out", "--model.init_args.scale", "none"],  # RLOO
], ids=["dr_grpo", "rloo"])  # fmt: skip
def test_grpo_variants_are_yaml_lines(tmp_path, variant):
    rows = _fit(tmp_path, "grpo", *variant, steps=2)
    assert len(_column(rows, "train/policy_loss")) == 2 and _column(rows, "val/loss") and _column(rows, "val/reward")


def test_simpo_with_a_step_scheduled_gamma(tmp_path):
    rows = _fit(tmp_path, "simpo", "--model", "my_pkg.variants.ScheduledSimPO", "--model.init_args.gamma", "2.0")
    losses = _column(rows, "train/loss")
    # step 0: gamma 0 and policy == start, the length-averaged margin starts near 0: the loss is near log 2; by
    # then gamma has grown to 1.5 and the loss with it (log(1 + e^(margin_gap)))
    assert losses[0] == pytest.approx(math.log(2), abs=0.05) and losses[3] > losses[0] + 0.3
    assert _column(rows, "val/loss")


def test_a_margin_reward_model_needs_only_the_data(tmp_path):
    rows = [json.loads(line) for line in (REPO / "rlft/assets/sample_pairs.jsonl").read_text().splitlines()]
    data = tmp_path / "pairs_with_margin.jsonl"
    data.write_text("".join(json.dumps({**row, "margin": 1.5}) + "\n" for row in rows))
    logged = _fit(tmp_path, "rm", "--data.init_args.path", str(data), "--trainer.max_steps", "1", steps=1)
    # rewards start at exactly 0 (zero head): the first loss is -log sigmoid(0 - 1.5) = softplus(1.5), not log 2
    assert _column(logged, "train/loss")[0] == pytest.approx(math.log1p(math.exp(1.5)), abs=1e-4)
    assert _column(logged, "val/loss") and _column(logged, "val/auroc")


def test_sgd_with_a_cosine_schedule_from_yaml(tmp_path):
    schedule = '{"lr": null, "scheduler": "cosine", "warmup_steps": 0}'  # the optimiser's own lr, decayed
    rows = _fit(tmp_path, "sft", "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.lr",
                "0.05", "--model.init_args.optim", schedule)  # fmt: skip
    lrs = _column(rows, "lr-SGD") or _column(rows, "lr-SGD/pg1")
    assert lrs and lrs[0] == pytest.approx(0.05) and lrs[-1] < lrs[0]  # the cosine decays the optimiser's own lr
    assert _column(rows, "val/loss")
