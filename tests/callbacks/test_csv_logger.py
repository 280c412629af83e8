"""rlft's CSV logger keeps every logged row when the process dies while a new column is being added."""

from __future__ import annotations

import csv

import pytest

from rlft.callbacks import CSVLogger


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_crash_while_a_column_is_added_keeps_the_logged_rows(tmp_path, monkeypatch):
    logger = CSVLogger(tmp_path, name="csv", flush_logs_every_n_steps=1)
    logger.log_metrics({"lr": 0.0}, step=0)
    metrics = logger.experiment.metrics_file_path
    assert _rows(metrics) == [{"lr": "0.0", "step": "0"}]

    def die(self, rows):  # the process dies half-way through the rewrite with the new header
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", die)
    with pytest.raises(KeyboardInterrupt):
        logger.log_metrics({"train/loss": 0.7}, step=0)
    assert _rows(metrics) == [{"lr": "0.0", "step": "0"}]


def test_columns_added_later_keep_the_earlier_rows(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", flush_logs_every_n_steps=1)
    logger.log_metrics({"lr": 0.0}, step=0)
    logger.log_metrics({"train/loss": 0.5}, step=0)
    logger.log_metrics({"val/loss": 0.25}, step=1)
    metrics = logger.experiment.metrics_file_path
    assert _rows(metrics) == [
        {"lr": "0.0", "step": "0", "train/loss": "", "val/loss": ""},
        {"lr": "", "step": "0", "train/loss": "0.5", "val/loss": ""},
        {"lr": "", "step": "1", "train/loss": "", "val/loss": "0.25"},
    ]
    assert sorted(p.name for p in (tmp_path / "csv" / "version_0").iterdir()) == ["metrics.csv"]
