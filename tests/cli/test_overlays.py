"""Every trainer overlay composes with every method config: `cpu` + `debug` run each method end to end (two
batches of training and validation, no checkpoints: the defaults' checkpoint callback is dropped, not refused);
`gpu` on a machine without one is refused in one line. The distributed overlays (ddp, deepspeed_zero2/3, fsdp) run
with every method in tests/distributed (test_strategies.py, test_matrix.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# every method's tiny config (a pipeline's tiny.yaml is not a `rlft fit` config)
METHODS = sorted(p.parent.name for p in (REPO / "configs").glob("*/tiny.yaml") if "\nmodel:" in p.read_text())
OVERLAYS = sorted(p.stem for p in (REPO / "configs" / "trainer").glob("*.yaml"))


def _fit(tmp_path: Path, method: str, *overlays: str) -> subprocess.CompletedProcess:
    text = (REPO / "configs" / method / "tiny.yaml").read_text().replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (tmp_path / "config.yaml").write_text(text)
    layers = [arg for name in overlays for arg in ("-c", str(REPO / "configs" / "trainer" / f"{name}.yaml"))]
    cmd = [sys.executable, "-m", "rlft", "fit", "-c", str(tmp_path / "config.yaml"), *layers,
           "--trainer.default_root_dir", str(tmp_path), "--model.init_args.output_dir", str(tmp_path / "hf"),
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_every_overlay_is_exercised_somewhere():
    covered = {"cpu", "debug", "gpu", "default", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
    assert set(OVERLAYS) <= covered, f"overlays no test runs: {set(OVERLAYS) - covered}"
    assert {"sft", "rm", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "reinforce_pp", "trpo"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_cpu_and_debug_overlays_run_every_method(tmp_path, method):
    result = _fit(tmp_path, method, "cpu", "debug")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "hf").is_dir() and not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_overlay_without_a_gpu_is_one_line(tmp_path):
    result = _fit(tmp_path, "sft", "gpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "gpu" in result.stderr.lower()
