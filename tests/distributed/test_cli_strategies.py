"""The user's commands: `rlft fit -c configs/<method>/tiny.yaml -c configs/trainer/<strategy>.yaml --trainer.accelerator
cpu --trainer.devices 2` trains, resumes from a sharded checkpoint onto the same loss curve, and exports a full
adapter that plain peft loads (and a merged model that plain transformers loads); 2 "nodes" on loopback match one
process; precision that cannot work on CPU is refused with a message."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]

pytestmark = pytest.mark.slow


def _config(root: Path, method: str = "dpo") -> Path:
    text = (REPO / "configs" / method / "tiny.yaml").read_text().replace(f"runs/{method}-tiny", str(root))
    text = text.replace("rlft/assets/", f"{REPO}/rlft/assets/")
    # a checkpoint every 3 steps, all kept, so a run can be resumed from the middle
    checkpoints = (
        "  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 3, save_top_k: -1}\n"
    )
    text = text.replace("trainer:\n", f"trainer:\n{checkpoints}", 1)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(text)
    return path


def _rlft(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlft", *args, "--trainer.enable_progress_bar", "false"]
    return subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _losses(root: Path) -> dict[int, float]:
    rows = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


@pytest.mark.parametrize("overlay", ["deepspeed_zero3", "fsdp"])
def test_sharded_run_resumes_on_the_same_curve_and_exports_full_weights(overlay, tmp_path):
    strategy = [
        "-c",
        str(REPO / "configs" / "trainer" / f"{overlay}.yaml"),
        *CPU2,
        "--trainer.max_steps",
        "6",
        "--trainer.limit_val_batches",
        "0",
        "--model.init_args.merge_on_save",
        "true",
    ]
    whole = tmp_path / "whole"
    result = _rlft("fit", "-c", str(_config(whole)), *strategy)
    assert result.returncode == 0, result.stderr[-4000:]
    # a second run starts from the first one's step-3 checkpoint (a folder of shards) as its `last`
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step3 = next((whole / "checkpoints").glob("*step=3.ckpt"))
    assert step3.is_dir(), "a sharded checkpoint is a folder of per-rank shards"
    shutil.copytree(step3, resumed / "checkpoints" / "last.ckpt")
    result = _rlft("fit", "-c", str(_config(resumed)), *strategy, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-4000:]
    full, rest = _losses(whole), _losses(resumed)
    # steps 3-5 are trained after the resume (the step before the checkpoint may be logged again: see
    # rlft.callbacks.ResumeLogContinuity); every logged step equals the uninterrupted run's
    assert {3, 4, 5} <= set(rest) <= {2, 3, 4, 5}, rest
    for step in rest:
        assert rest[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    a = load_file(whole / "hf_model" / "adapter_model.safetensors")
    b = load_file(resumed / "hf_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].numel() > 0 and a[key].abs().sum() > 0 or "lora_A" not in key, key
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)

    # plain peft and plain transformers load the exports; the merged model is base + adapter
    import peft
    from transformers import AutoModelForCausalLM

    from rlft.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path)
    with_adapter = peft.PeftModel.from_pretrained(base, str(whole / "hf_model")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(whole / "hf_model" / "merged")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        trained = with_adapter(ids).logits
        with with_adapter.disable_adapter():
            assert (trained - with_adapter(ids).logits).abs().max() > 1e-4, "the exported adapter is a no-op"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_one_process(tmp_path):
    single = tmp_path / "single"
    result = _rlft(
        "fit",
        "-c",
        str(_config(single, "sft")),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "0",
        "--data.batch_size",
        "4",
        "--data.val_fraction",
        "0",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    nodes = tmp_path / "nodes"
    config = _config(nodes, "sft")
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {
            **ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(node),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
        }
        cmd = [
            sys.executable,
            "-m",
            "rlft",
            "fit",
            "-c",
            str(config),
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--data.batch_size",
            "2",
            "--data.val_fraction",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.enable_progress_bar",
            "false",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outputs]
    with open(next((single / "csv").glob("version_*/metrics.csv"))) as f:
        one = {int(r["step"]): float(r["train/global_loss"]) for r in csv.DictReader(f) if r.get("train/global_loss")}
    with open(next((nodes / "csv").glob("version_*/metrics.csv"))) as f:
        two = {int(r["step"]): float(r["train/global_loss"]) for r in csv.DictReader(f) if r.get("train/global_loss")}
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


# Lightning itself refuses 16-mixed with ModelParallelStrategy at parse time; 16-true gets through to rlft's check
@pytest.mark.parametrize("overlay, precision", [("deepspeed_zero2", "16-mixed"), ("fsdp", "16-true")])
def test_fp16_on_cpu_is_refused_with_the_fix(overlay, precision, tmp_path):
    args = [
        "-c",
        str(REPO / "configs" / "trainer" / f"{overlay}.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        precision,
        "--trainer.max_steps",
        "1",
    ]
    result = _rlft("fit", "-c", str(_config(tmp_path / "run", "sft")), *args)
    assert result.returncode != 0
    assert "on CPU" in result.stderr and "32-true" in result.stderr, result.stderr[-3000:]
