"""The agent path composes like single-turn online RL: a tool-using GRPO run killed after 2 steps and resumed with
``--ckpt_path last`` ends with the weights of the run that never stopped, with an evaluation callback firing in
both (the strategies are in tests/distributed/test_agent_strategies.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from rlft.cli import main

REPO = Path(__file__).resolve().parents[2]


def _fit(root: Path, steps: int, *extra: str) -> None:
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs/grpo/agent_tiny.yaml"),
            "--data.path",
            str(REPO / "rlft/assets/tool_arithmetic.jsonl"),
            "--trainer.max_steps",
            str(steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.callbacks.every_n_train_steps",
            "2",
            "--trainer.callbacks+=rlft.callbacks.PerplexityCallback",
            "--trainer.callbacks.data",
            str(REPO / "rlft/assets/sample_sft.jsonl"),
            "--trainer.callbacks.limit",
            "4",
            "--trainer.callbacks.every_n_steps",
            "2",
            "--trainer.callbacks.at_fit_end",
            "false",
            *extra,
        ]
    )


def _perplexities(root: Path) -> dict[int, float]:
    frames = [pd.read_csv(path) for path in sorted((root / "csv").glob("version_*/metrics.csv"))]
    rows = pd.concat(frames).dropna(subset=["eval/perplexity"])
    return dict(zip(rows["step"].astype(int), rows["eval/perplexity"]))


def test_agent_grpo_resumes_exactly_with_an_eval_callback(tmp_path):
    _fit(tmp_path / "whole", 4)
    _fit(tmp_path / "cut", 2)
    _fit(tmp_path / "cut", 4, "--ckpt_path", "last")
    whole = load_file(tmp_path / "whole" / "hf_model" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "hf_model" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    # the callback evaluated at steps 2 and 4 in both runs, on the same weights
    assert _perplexities(tmp_path / "whole") == _perplexities(tmp_path / "cut")
    assert len(_perplexities(tmp_path / "whole")) == 2
