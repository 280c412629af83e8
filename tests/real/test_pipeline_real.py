"""Real tier: ``rlft pipeline`` trains a SmolLM2-135M-Instruct reward model on the real HH-RLHF harmless pairs and
the held-out evaluation shows it beats chance, with a 95 % CI that excludes 0.5.

Bounded: one reward-model stage (LoRA on the top 4 of 30 blocks so backward stops there, 128-token sequences,
200 steps of 4 pairs, about half an epoch) and all 251 usable held-out pairs; 7 minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1800)]

TOP4 = [
    f"layers.{i}.{p}"
    for i in range(26, 30)
    for p in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def test_reward_model_beats_chance_on_held_out_hh_pairs(repo_root, shared_data, smollm2, tmp_path):
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "paths": [
                str(shared_data / "hh_rlhf_harmless_sample.jsonl"),
                str(shared_data / "hh_rlhf_harmless_train.jsonl"),
            ],
            "heldout_fraction": 0.15,
            "seed": 0,
        },
        "stages": {
            "rm": {
                "config": "configs/rm/smollm2_lora.yaml",
                "args": {
                    "trainer.max_steps": 200,
                    "trainer.val_check_interval": 200,
                    "trainer.limit_val_batches": 2,
                    "data.batch_size": 4,
                    "data.max_length": 128,
                    "data.val_fraction": 0.02,
                    "model.lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TOP4},
                    "model.optim": {"lr": 5.0e-4, "warmup_ratio": 0.05, "scheduler": "cosine"},
                },
            }
        },
        "evaluation": {"pairs_limit": 1000, "rm_max_length": 128, "n_bootstrap": 2000},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "rlft", "pipeline", "-c", str(path)],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rm = json.loads((tmp_path / "run" / "evaluation" / "results.json").read_text())["reward_model"]
    print(f"held-out RM: accuracy {rm['accuracy']:.3f} {rm['accuracy_ci']}, AUROC {rm['auroc']:.3f} {rm['auroc_ci']}")
    # every held-out pair of the split: 8 unusable rows and 2 with consecutive same-role turns (an invalid
    # conversation since the data layer checks turn order) are dropped before it
    assert rm["n"] == 250
    # measured on this CPU: accuracy 0.570 [0.506, 0.629], AUROC 0.576 [0.536, 0.613]. The AUROC's CI excludes
    # chance with room; the pair accuracy's lower bound sits at 0.506, too close to 0.5 to survive another CPU's
    # thread count reordering float sums, so only its point estimate is asserted
    assert rm["auroc_ci"][0] > 0.5 and rm["accuracy"] > 0.53, rm
    assert "No policy stage" in (tmp_path / "run" / "report" / "report.md").read_text()
