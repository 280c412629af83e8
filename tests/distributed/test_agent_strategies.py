"""Tool-using, multi-turn GRPO under the strategies a user overlays: 2 CPU processes with DDP, DeepSpeed ZeRO-2 and
ZeRO-3 and FSDP2, each rank running its own episodes (different numbers of turns per rank are fine: sampling holds
the full weights and runs no collective), the updates synchronised as in single-turn training."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO / "tests" / "methods"),  # the scripted sampler
}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overlay", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_agent_grpo_trains_on_two_processes(overlay, tmp_path):
    config = (REPO / "configs" / "grpo" / "agent_tiny.yaml").read_text().replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (tmp_path / "config.yaml").write_text(config)
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(tmp_path / "config.yaml"),
        "-c",
        str(REPO / "configs" / "trainer" / f"{overlay}.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
        "--model.init_args.output_dir",
        str(tmp_path / "hf"),
        "--model.init_args.decoder.backend",
        "my_pkg.agent_script:scripted",
        "--model.init_args.sampling.max_new_tokens",
        "120",
        "--model.init_args.agent.max_tokens",
        "400",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    turns = [float(r["train/agent/turns"]) for r in rows if r.get("train/agent/turns")]
    rewards = [float(r["train/reward"]) for r in rows if r.get("train/reward")]
    assert turns == [2.0, 2.0] and rewards == [1.0, 1.0]
    assert (tmp_path / "hf" / "adapter_model.safetensors").exists()
