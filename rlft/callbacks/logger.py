"""A CSV logger whose file survives a SIGKILL: Lightning's rewrites ``metrics.csv`` in place whenever a new column
appears (the learning rate at step 0, the first ``train/*`` values, the first validation), so a crash during that
rewrite leaves the file empty and loses every row already logged. Here the rewrite goes to a temporary file that
replaces the old one atomically."""

from __future__ import annotations

import csv
import os

from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AtomicExperimentWriter(ExperimentWriter):
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        partial = f"{self.metrics_file_path}.partial"
        with open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.metrics_file_path)


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` (same arguments and files) with a crash-safe ``metrics.csv`` on a local disk."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            local = isinstance(self._fs, LocalFileSystem)  # os.replace needs a local path
            self._experiment = (_AtomicExperimentWriter if local else ExperimentWriter)(log_dir=self.log_dir)
        return self._experiment
