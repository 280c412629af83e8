"""What the hardware runs fast: the one answer behind every ``auto`` precision choice (the trainer's
``precision: auto``, sampling's ``decode_dtype: auto``)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# CPU features that make a bf16 matmul native (oneDNN uses them), i.e. faster than fp32 rather than emulated
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere, which reads as "no native bf16")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device``: a CUDA GPU with bf16 support (Ampere and later), or a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(cpu_flags() & BF16_CPU_FLAGS)
    return False


def accelerator_device(accelerator: str | None) -> str:
    """The device type a Lightning ``accelerator`` setting runs on (``auto``: a GPU when there is one)."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if name in ("cpu", "auto") else name


def auto_precision(accelerator: str | None) -> str:
    """``bf16-mixed`` where the hardware runs bf16 natively, else ``32-true``."""
    return "bf16-mixed" if fast_bf16(accelerator_device(accelerator)) else "32-true"


def decoding_dtype(setting: str | None, weights: torch.Tensor) -> torch.dtype | None:
    """The dtype of a sampling twin (``decoder.decode_dtype``) for a policy whose weights look like ``weights``:
    ``None`` for no twin. ``auto``: a bf16 twin of a fp32 policy on hardware with native bf16 (half the memory
    traffic per decoded token), no twin elsewhere or for a policy already in 16 bits."""
    if setting != "auto":
        return None if setting is None else getattr(torch, setting)
    return torch.bfloat16 if weights.dtype == torch.float32 and fast_bf16(weights.device) else None
