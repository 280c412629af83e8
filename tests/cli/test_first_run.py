"""A first run that talks: progress with loss, throughput and ETA when the bar is off, and no warning a user cannot act
on (the libraries' deprecation notices, Lightning's tips); ``--debug`` shows everything."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L

from rlft.callbacks import ProgressLine
from rlft.cli import quiet_third_party
from rlft.data import PreferenceDataModule
from rlft.methods import SFT

REPO = Path(__file__).resolve().parents[2]


def _fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["fit", "-c", "configs/sft/tiny.yaml", "--trainer.default_root_dir", str(root)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "rlft", *argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_shipped_config_without_a_bar_prints_progress_and_no_library_noise(tmp_path):
    run = _fit(tmp_path / "run", "--trainer.enable_progress_bar", "false")
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr
    assert "rlft: training 20 steps" in err
    assert re.search(r"rlft: step 1/20 \(5%\) \| loss [\d.]+ \| .*elapsed, ETA \d+:\d\d:\d\d", err), err
    assert re.search(r"rlft: step 20/20 \(100%\) \| loss [\d.]+ \| [\d,]+ tok/s \| \d+:\d\d:\d\d elapsed\n", err), err
    assert re.search(r"rlft: validation at step 10 \| val/loss [\d.]+", err), err
    for noise in ("Warning", "warnings.warn", "Tip:", "litlogger", "Loading weights", "Failed to load CPU"):
        assert noise not in err, f"{noise!r} in the output of a plain run:\n{err}"
    assert (tmp_path / "run" / "hf_model" / "adapter_config.json").is_file()
    # --debug keeps what the plain run dropped (Lightning prints its tip at every fit; which deprecation notices the
    # libraries print depends on their versions, so the warning filter is checked in-process below)
    loud = _fit(tmp_path / "loud", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--debug")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Tip:" in loud.stderr


def test_the_filter_drops_library_deprecations_and_keeps_the_users():
    def shown(module: str, category: type[Warning]) -> bool:
        with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
            warnings.simplefilter("always")
            quiet_third_party()
            warnings.warn_explicit("old API", category, f"{module.replace('.', '/')}.py", 1, module=module)
        return bool(caught)

    assert not shown("transformers.modeling_utils", FutureWarning)
    assert not shown("lightning.pytorch.trainer", DeprecationWarning)
    assert shown("transformers.modeling_utils", UserWarning)  # only deprecations are dropped
    assert shown("my_research.losses", FutureWarning)  # a user's own deprecation stays
    assert shown("rlft.methods.base", FutureWarning)  # and so does rlft's


def test_the_line_is_silent_while_a_progress_bar_is_shown(tmp_path):
    def fit(bar: bool) -> str:
        stream = io.StringIO()
        data = PreferenceDataModule(path=str(REPO / "rlft/assets/sample_sft.jsonl"), batch_size=4, max_length=64)
        trainer = L.Trainer(
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=bar,
            limit_val_batches=0,
            callbacks=[ProgressLine(every_seconds=0.0, stream=stream)],
            default_root_dir=tmp_path,
        )
        trainer.fit(SFT(model="tiny-llama", lora={"r": 4}, output_dir=str(tmp_path / f"out{bar}")), datamodule=data)
        return stream.getvalue()

    assert fit(bar=True) == ""
    lines = fit(bar=False).splitlines()
    assert lines[0] == "rlft: training 3 steps" and [line.split(" |")[0] for line in lines[1:]] == [
        "rlft: step 1/3 (33%)",
        "rlft: step 2/3 (67%)",
        "rlft: step 3/3 (100%)",
    ]
