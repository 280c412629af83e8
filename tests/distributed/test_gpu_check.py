"""scripts/gpu_check.sh --dry-run runs its CPU-safe checks on tiny models and writes both reports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_report_of_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {
        "bench_sft",
        "bench_dpo",
        "mfu_sft",
        "mfu_dpo",
        "qlora_4bit",
        "fp16_sft",
        "zero2",
        "zero3",
        "fsdp",
        "grpo_rollouts",
        "grpo_vllm_colocate",
    }
    for name in ("bench_sft", "bench_dpo", "qlora_4bit", "fp16_sft", "grpo_vllm_colocate"):
        assert checks[name]["status"] == "skipped"
    for name in ("zero2", "zero3", "fsdp"):
        assert checks[name]["status"] == "ok" and checks[name]["round_trip"]["status"] == "ok", checks[name]
        assert checks[name]["round_trip"]["adapter_lora_b_abs_sum"] > 0
        assert len(checks[name]["eval_perplexity"]) == 2, checks[name]  # the callback ran at steps 2 and 4
    assert checks["mfu_sft"]["flops_per_sec"] > 0 and checks["mfu_dpo"]["tokens_per_sec"] > 0
    assert checks["grpo_rollouts"]["rollout_tokens_per_sec_median"] > 0
    assert "| zero3 | ok |" in (tmp_path / "gpu_report.md").read_text()
