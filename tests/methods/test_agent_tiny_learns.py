"""The tiny tool-use recipe end to end through the `rlft` CLI: `tiny-llama` (2 layers, random init) learns to call
the calculator and answer with its result (configs/sft/tools_tiny.yaml), and its success on held-out tasks from
another seed (rlft/assets/tool_tiny_heldout.jsonl, triples in no training file) rises from chance to near 1, measured
by `rlft eval agent` with the rollout code training uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
EVAL = [
    "--tools",
    "[calculator]",
    "--environment_args",
    "{show_tools: false}",
    "--reward",
    "exact_match",
    "--max_turns",
    "2",
    "--max_new_tokens",
    "80",
    "--max_tokens",
    "192",
    "--temperature",
    "1",
    "--batch_size",
    "64",
]


def _rlft(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlft", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _held_out_success(model: str, out: Path) -> dict:
    _rlft("eval", "agent", model, str(REPO / "rlft" / "assets" / "tool_tiny_heldout.jsonl"), *EVAL, "--out", str(out))
    return json.loads((out / "agent.json").read_text())["metrics"]


def test_tiny_llama_learns_the_calculator_and_succeeds_on_held_out_tasks(tmp_path):
    before = _held_out_success("tiny-llama", tmp_path / "before")
    _rlft(
        "fit",
        "-c",
        str(REPO / "configs" / "sft" / "tools_tiny.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.logger",
        "false",
        "--model.init_args.output_dir",
        str(tmp_path / "hf"),
    )
    after = _held_out_success(str(tmp_path / "hf"), tmp_path / "after")
    print(f"tiny-llama on 128 held-out calculator tasks: before {before} -> after {after}")
    assert before["tool_calls_per_episode"] == 0.0  # untrained, it never calls the tool
    assert after["tool_calls_per_episode"] >= 0.95 and after["invalid_call_rate"] <= 0.05
    assert after["success_rate"] >= 0.8
    assert after["success_ci_low"] > before["success_ci_high"]  # Wilson 95 % intervals apart
