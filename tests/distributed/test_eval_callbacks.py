"""Evaluation callbacks under every strategy: `rlft fit ... -c configs/trainer/<overlay>.yaml --trainer.devices 2
--trainer.callbacks+=rlft.callbacks.PerplexityCallback` finishes (it hung forever under FSDP2 and ZeRO-3: rank 0
evaluated alone while its sharded forward waited for the other rank), logs `eval/perplexity` once per step, and
the number equals the one-process run's on the same weights."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.slow


def _perplexity(root: Path, *strategy: str) -> dict[int, float]:
    text = (REPO / "configs" / "sft" / "tiny.yaml").read_text().replace("runs/sft-tiny", str(root))
    config = root.parent / f"{root.name}.yaml"
    config.write_text(text.replace("rlft/assets/", f"{REPO}/rlft/assets/"))
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(config),
        *strategy,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=rlft.callbacks.PerplexityCallback",
        "--trainer.callbacks.data",
        str(REPO / "rlft/assets/sample_sft.jsonl"),
        "--trainer.callbacks.limit",
        "8",
        "--trainer.callbacks.every_n_steps",
        "1",
    ]
    # bounded: the failure this guards against is a hang
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("eval/perplexity")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"logged more than once per step: {steps}"
    return {int(r["step"]): float(r["eval/perplexity"]) for r in rows}


@pytest.mark.parametrize("overlay", ["fsdp", "deepspeed_zero3", "ddp"])
def test_perplexity_callback_under_two_processes_equals_one_process(overlay, tmp_path):
    # one process with the global batch of two (4 rows per rank)
    single = _perplexity(
        tmp_path / "single",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--data.batch_size",
        "8",
    )
    sharded = _perplexity(
        tmp_path / overlay,
        "-c",
        str(REPO / "configs" / "trainer" / f"{overlay}.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32-true",
    )
    assert set(sharded) == set(single) == {1, 2}
    for step, value in single.items():  # two processes see the global batch one process sees
        assert sharded[step] == pytest.approx(value, rel=1e-4), (step, sharded, single)
