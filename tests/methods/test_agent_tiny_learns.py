"""The tiny tool-use recipe end to end through the `rlft` CLI: `tiny-llama` (2 layers, random init) learns by SFT to
call the calculator (configs/sft/tools_tiny.yaml, stopped at 550 steps, mid-way through learning to read the tool's
result), then agent GRPO rewarded on the final answer alone (configs/grpo/agent_tiny_rl.yaml) raises its success on
held-out tasks from another seed (rlft/assets/tool_tiny_heldout.jsonl, triples in no training file), measured by
`rlft eval agent` with the rollout code training uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
QUIET = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.logger",
    "false",
]
SFT_STEPS = "550"
# The switch from "calls right" to "reads the result" is sharp, and where it lands moves with the libraries' float
# sums (550 steps gave 25.8 % success with one resolution of the dependencies; with another, 9 % at 375 steps, 51 %
# at 390 and 87 % at 405): RL starts from the latest checkpoint (every 15 steps) at or below 70 %, found by bisection
CHECK_EVERY = 15  # (10 would collide with the run's own checkpoint callback, which saves every 10 steps)
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
    "--samples",
    "2",
    "--batch_size",
    "64",
]


def _rlft(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlft", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _held_out_success(model: Path, out: Path) -> dict:
    _rlft(
        "eval", "agent", str(model), str(REPO / "rlft" / "assets" / "tool_tiny_heldout.jsonl"), *EVAL, "--out", str(out)
    )
    return json.loads((out / "agent.json").read_text())["metrics"]


def _inside_the_switch(metrics: dict) -> bool:
    # SFT taught the call (an untrained tiny-llama never calls: 5.9 % success by guessing, docs/agents.md), but the
    # tool's result is read only sometimes: room for RL to raise success
    return (
        metrics["tool_calls_per_episode"] >= 0.9
        and metrics["invalid_call_rate"] <= 0.2
        and metrics["success_rate"] <= 0.7
    )


def test_tiny_llama_learns_the_calculator_by_sft_and_rl_raises_held_out_success(tmp_path):
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    _rlft(
        "fit",
        "-c",
        str(REPO / "configs" / "sft" / "tools_tiny.yaml"),
        "--trainer.max_steps",
        SFT_STEPS,
        "--trainer.val_check_interval",
        SFT_STEPS,
        "--trainer.default_root_dir",
        str(sft),
        *QUIET[:2],  # no progress bar; checkpoints on (below)
        "--trainer.logger",
        "false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(sft / "steps"),
        "--trainer.callbacks.every_n_train_steps",
        str(CHECK_EVERY),
        "--trainer.callbacks.save_top_k",
        "-1",
        "--trainer.callbacks.filename",
        "{step}",
    )
    tried: dict[int, dict] = {}

    def success(step: int) -> float:
        if step not in tried:
            tried[step] = _held_out_success(sft / "steps" / f"step={step}.ckpt", tmp_path / f"before{step}")
        return tried[step]["success_rate"]

    steps = list(range(CHECK_EVERY, int(SFT_STEPS) + 1, CHECK_EVERY))
    low, high = 0, len(steps) - 1  # success rises with the steps: the last step at or below 0.7
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if success(steps[middle]) <= 0.7 else (low, middle - 1)
    step = steps[low]  # (just below the switch a tiny model may skip the call for a while: no earlier step is better)
    success(step)
    start, before = sft / "steps" / f"step={step}.ckpt", tried[step]
    assert _inside_the_switch(before), f"no SFT checkpoint calls right yet reads the result only sometimes: {tried}"
    _rlft(
        "fit",
        "-c",
        str(REPO / "configs" / "grpo" / "agent_tiny_rl.yaml"),
        "--model.init_args.model",
        str(start),
        "--trainer.default_root_dir",
        str(rl),
        *QUIET,
    )
    after = _held_out_success(rl / "hf_model", tmp_path / "after")
    print(f"tiny-llama on 128 held-out calculator tasks: SFT at step {step} {before} -> + GRPO {after}")
    assert after["tool_calls_per_episode"] >= 0.9 and after["invalid_call_rate"] <= 0.1
    assert after["success_ci_low"] > before["success_ci_high"]  # RL raised success: Wilson 95 % intervals apart
