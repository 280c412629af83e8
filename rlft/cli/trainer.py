"""The Trainer ``rlft fit`` builds: Lightning's, plus ``precision: auto``."""

from __future__ import annotations

import os
import sys
from typing import Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT

from rlft.models.hardware import accelerator_device, auto_precision


class Trainer(L.Trainer):
    """:class:`lightning.Trainer` whose ``precision`` also takes ``auto``: ``bf16-mixed`` where the hardware runs bf16
    matmuls natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), ``32-true`` elsewhere — the setting the
    benchmarks recommend on each (docs/performance.md). The choice is printed once."""

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs) -> None:
        if precision == "auto":
            precision = auto_precision(kwargs.get("accelerator"))
            if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
                device = accelerator_device(kwargs.get("accelerator"))
                why = "runs bf16 natively" if precision.startswith("bf16") else "has no native bf16 matmul"
                print(f"rlft: precision auto -> {precision} (this {device} {why})", file=sys.stderr)
        super().__init__(precision=precision, **kwargs)
