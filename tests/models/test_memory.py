"""Freed heap goes back to the OS: glibc keeps it resident otherwise (what the sharding strategies, the bf16 storage
and the online methods rely on to keep their peak down)."""

from __future__ import annotations

import sys

import pytest
import torch

from rlft.models.memory import return_freed_memory


def anonymous_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_heap_stays_resident_until_returned():
    # 64 KB tensors come from the heap (below glibc's mmap threshold); every other one survives, so the freed ones
    # can neither merge with each other nor shrink the heap's top: they stay resident, as a step's fragments do
    kept, freed = [], []
    for _ in range(3000):
        freed.append(torch.ones(16 * 1024))
        kept.append(torch.full((16 * 1024,), 2.0))
    del freed
    resident = anonymous_mb()
    return_freed_memory(collect_garbage=False)
    assert resident - anonymous_mb() > 100  # of the ~190 MB freed
    assert all(float(t[0] + t[-1]) == 4 for t in kept)
