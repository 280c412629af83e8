"""Fixtures for the tuning tests: tiny-model trials of a few steps, run from the repo root with a private cache."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

# a trial of the tiny configs in a few seconds: 8 steps, validation at 4 and 8, nothing printed per step
TINY = [
    "--trainer.max_steps",
    "8",
    "--trainer.val_check_interval",
    "4",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(autouse=True)
def _repo_cwd_and_cache(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)  # the configs name their data relative to the repo
    monkeypatch.setenv("RLFT_DATA_CACHE", str(tmp_path / "data-cache"))


@pytest.fixture
def write_search(tmp_path):
    def write(space: dict, name: str = "search.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(space))
        return str(path)

    return write


def _last_logged(metrics_csv: Path, metric: str) -> float:
    with open(metrics_csv) as handle:
        values = [float(row[metric]) for row in csv.DictReader(handle) if row.get(metric)]
    assert values, f"{metric} not in {metrics_csv}"
    return values[-1]


@pytest.fixture
def last_logged():
    """``last_logged(metrics_csv, metric)``: the last value of ``metric`` in a CSVLogger's metrics.csv."""
    return _last_logged


@pytest.fixture
def tiny() -> list[str]:
    """Config overrides that make a tiny-config trial take seconds."""
    return list(TINY)
