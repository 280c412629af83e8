"""Data parallel on CPU (gloo) through the CLI gives the same training as one process with the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _fit(root: Path, *extra: str, logs: list[str] | None = None) -> dict[int, float]:
    config = (REPO / "configs" / "sft" / "tiny.yaml").read_text().replace("runs/sft-tiny", str(root))
    config = config.replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (root.parent / f"{root.name}.yaml").write_text(config)
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(root.parent / f"{root.name}.yaml"),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "0",
        "--data.shuffle",
        "false",
        "--data.val_fraction",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    if logs is not None:
        logs.append(result.stdout + result.stderr)
    with open(next((root / "csv").glob("version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/global_loss")]
    return {int(r["step"]): float(r["train/global_loss"]) for r in rows}


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    single = _fit(tmp_path / "single", "--data.batch_size", "4")
    ddp = _fit(
        tmp_path / "ddp",
        "--data.batch_size",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
    )
    assert sorted(single) == sorted(ddp) == [0, 1, 2]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5), f"step {step}"
    a = load_file(tmp_path / "single" / "hf_model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "hf_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ddp_in_bf16_mixed_stores_frozen_weights_in_bf16_and_trains_exactly_as_without(tmp_path):
    from rlft.models import load_model, load_tokenizer

    model = tmp_path / "bf16-model"  # tiny-llama saved in bf16, as hub checkpoints are
    load_model("tiny-llama").to(torch.bfloat16).save_pretrained(model)
    load_tokenizer("tiny-llama").save_pretrained(model)
    ddp = [
        "--data.batch_size",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "bf16-mixed",
        "--model.init_args.model",
        str(model),
    ]
    logs: list[str] = []
    stored = _fit(tmp_path / "stored", *ddp, logs=logs)
    assert "15 frozen linear layers stored in bf16" in logs[0]
    plain = _fit(tmp_path / "plain", *ddp, "--model.init_args.frozen_weights_bf16", "false", logs=logs)
    assert "stored in bf16" not in logs[1]
    assert stored == plain and sorted(stored) == [0, 1, 2]
    a = load_file(tmp_path / "stored" / "hf_model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "hf_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
