"""Returning memory to the OS after a sharded build (shared by the DeepSpeed and FSDP2 strategies)."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory() -> None:
    """Give the heap freed while a network was built and sharded back to the OS.

    glibc keeps freed heap for reuse, so the tensors a rank held only until it sharded them stay resident: measured
    ~190 MB more per rank after setup for SmolLM2-135M on CPU under ZeRO-3.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
