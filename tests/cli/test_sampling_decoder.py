"""An online method's `sampling:` (what is sampled) and `decoder:` (how) through `rlft fit`, and the one line a
config that still puts a decoder key under `sampling:` gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _fit(*args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "RLFT_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "rlft", "fit", "-c", "configs/grpo/tiny.yaml", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)


def test_grpo_runs_with_sampling_and_decoder_blocks(tmp_path):
    result = _fit(
        "--model.init_args.sampling",
        "{max_new_tokens: 6, temperature: 0.9, top_k: 20}",
        "--model.init_args.decoder",
        "{backend: rlft, batch_size: 4, lean_step: false}",
        "--model.init_args.share_prompts",
        "false",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "batch_size: 4" in saved and "lean_step: false" in saved and "top_k: 20" in saved


@pytest.mark.parametrize(
    "args",
    [
        ("--model.init_args.sampling", "{max_new_tokens: 6, decode_dtype: auto}"),  # a YAML block
        ("--model.init_args.sampling.decode_dtype", "auto"),  # one dotted flag
    ],
)
def test_a_decoder_key_under_sampling_fails_at_start_in_one_line(args):
    result = _fit(*args, "--trainer.max_steps", "1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        "rlft fit: error: sampling.decode_dtype is a decoder setting: move it from `sampling:` to `decoder:` "
        "(model.decoder.decode_dtype)"
    ], result.stderr[-3000:]
