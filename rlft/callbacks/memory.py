"""Per-rank memory report: what each process held after loading, during training and at its peak."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import lightning as L
import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _anonymous_mb() -> float:
    """Resident memory that is not a mapped file (RssAnon): the tensors this process holds itself, without the
    page-cache pages of an mmap-ed checkpoint that every process on the machine shares."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; the kernel updates this high-water mark lazily, so it can trail the current RSS
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb())


class MemoryReport(L.Callback):
    """Writes ``<default_root_dir>/memory/rank<R>.json`` at the end of fit: RSS and its anonymous part (without
    mapped checkpoint files) after the model was loaded and sharded (train start) and after the first optimisation
    steps, and the process's peak RSS; peak GPU memory too.

    Args:
        after_steps: Measure the training-time RSS after this many steps.
    """

    def __init__(self, after_steps: int = 2) -> None:
        self.after_steps = after_steps
        self.numbers: dict[str, float] = {}

    def on_fit_start(self, trainer, module) -> None:
        self.numbers["peak_rss_mb_at_fit_start"] = _peak_rss_mb()

    def on_train_start(self, trainer, module) -> None:
        self.numbers["rss_mb_after_setup"] = _rss_mb()
        self.numbers["anon_mb_after_setup"] = _anonymous_mb()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.after_steps and "rss_mb_training" not in self.numbers:
            self.numbers["rss_mb_training"] = _rss_mb()
            self.numbers["anon_mb_training"] = _anonymous_mb()

    def on_fit_end(self, trainer, module) -> None:
        sampled = [v for k, v in self.numbers.items() if k.startswith("rss_mb")]
        self.numbers["peak_rss_mb"] = max(_peak_rss_mb(), *sampled)
        if torch.cuda.is_available():
            self.numbers["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        folder = Path(trainer.default_root_dir) / "memory"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.numbers, indent=2))
