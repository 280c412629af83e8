"""`rlft fit` as a user runs it, for the method tests: a config in a subprocess, its metrics read back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# my_pkg (the research variants) importable as a user's package; one thread so parallel runs do not thrash
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "methods"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Metrics(list):
    """The rows of a run's metrics.csv."""

    def column(self, name: str) -> list[float]:
        """Every logged value of ``name``, in order."""
        return [float(row[name]) for row in self if row.get(name)]


@pytest.fixture()
def cli_fit(tmp_path):
    """``fit(method, *args, steps=3, validate=True, env=None)``: ``rlft fit -c configs/<method>/tiny.yaml`` for
    ``steps`` optimiser steps (validating once at the end on one batch), every output under ``tmp_path``."""

    def fit(method: str, *args: str, steps: int = 3, validate: bool = True, env: dict | None = None) -> Metrics:
        config = (REPO / "configs" / method / "tiny.yaml").read_text().replace("rlft/assets/", f"{REPO}/rlft/assets/")
        (tmp_path / "config.yaml").write_text(config)
        checks = ["--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1"] if validate else []
        cmd = [
            sys.executable,
            "-m",
            "rlft",
            "fit",
            "-c",
            str(tmp_path / "config.yaml"),
            "--trainer.max_steps",
            str(steps),
            *checks,
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
            *args,
        ]
        result = subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        with open(next(tmp_path.rglob("metrics.csv"))) as f:
            return Metrics(csv.DictReader(f))

    return fit
