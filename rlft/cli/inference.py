"""The inference flags every command that runs a model takes (``--device``, ``--dtype``, ``--quantization``) and
the one loader behind them, shared by ``rlft generate``, ``rlft eval *`` and ``rlft serve``."""

from __future__ import annotations

import os
from typing import Literal

Quantization = Literal["4bit", "8bit"]
DEVICE_HELP = "where the model runs: cuda, cuda:N or cpu (default: cuda when available)"
DTYPE_HELP = "weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU)"
QUANTIZATION_HELP = "load weights in 4bit or 8bit through bitsandbytes (CUDA only)"


def add_inference_arguments(parser) -> None:
    """Add ``--device``, ``--dtype`` and ``--quantization`` to a jsonargparse parser."""
    parser.add_argument("--device", type=str | None, default=None, help=DEVICE_HELP)
    parser.add_argument("--dtype", type=str | None, default=None, help=DTYPE_HELP)
    parser.add_argument("--quantization", type=Quantization | None, default=None, help=QUANTIZATION_HELP)


def resolve_inference(device: str | None, dtype: str | None, quantization: str | None) -> tuple[str, str]:
    """``(device, dtype)`` after defaults, or a clear error for a combination that cannot run here."""
    import torch

    from rlft.models.loading import DTYPES

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if not device.startswith(("cuda", "cpu")):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if quantization is not None:
        if quantization not in ("4bit", "8bit"):
            raise ValueError(f"--quantization must be 4bit or 8bit, got {quantization!r}")
        if not device.startswith("cuda"):
            raise ValueError(
                f"--quantization {quantization} needs a CUDA GPU (bitsandbytes has no CPU kernels); "
                "drop --quantization to run on the CPU"
            )
    if dtype is None:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    return device, dtype


def load_for_inference(
    model: str, *, device: str | None = None, dtype: str | None = None, quantization: str | None = None
):
    """``(model, tokenizer)`` for any model string, frozen, in eval mode, on ``device`` (adapters unmerged)."""
    import transformers

    from rlft.models import load_model, load_tokenizer
    from rlft.models.checkpoint import is_checkpoint

    if not os.environ.get("RLFT_DEBUG"):
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar: noise in a log, gone in a blink
    device, dtype = resolve_inference(device, dtype, quantization)
    if quantization and is_checkpoint(model):
        raise ValueError("--quantization does not apply to a .ckpt; `rlft export` it to a merged folder first")
    network = load_model(model, dtype=dtype, quantization=quantization, trainable_adapter=False)
    if not quantization:  # bitsandbytes already placed the weights on the GPU
        network = network.to(device)
    return network.eval().requires_grad_(False), load_tokenizer(model)
