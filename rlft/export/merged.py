"""A plain Hugging Face folder from any model string: LoRA merged into the base, tokenizer and chat template kept.

The folder loads with ``transformers`` alone (no peft, no rlft) and is what the GGUF and ONNX exporters start
from, so every format sees the same merged weights and the same tokenizer files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlft.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


def merged_model(model: str, *, dtype: str = "float32") -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` with every LoRA adapter merged into the base weights (frozen, eval mode).

    Args:
        model: Any rlft model string: alias, hub id, folder, adapter folder, ``.ckpt`` or ``.gguf``.
        dtype: Weights dtype of the result; merging itself happens in the dtype the model loads in.
    """
    import peft

    network = load_model(model, dtype="float32", trainable_adapter=False)
    if isinstance(network, peft.PeftModel):
        network = network.merge_and_unload()
    network = _plain_copy(network)
    if dtype != "float32":
        from rlft.models.loading import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        network = network.to(DTYPES[dtype])
    return network.eval().requires_grad_(False), load_tokenizer(model)


def _plain_copy(network: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built from its config: a GGUF-loaded model refuses ``save_pretrained`` (its
    config carries the GGUF ``quantization_config``), a rebuilt one does not."""
    config = network.config
    if getattr(config, "quantization_config", None) is None:
        return network
    import transformers

    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=next(network.parameters()).dtype)
    plain.load_state_dict(network.state_dict())
    plain.generation_config = network.generation_config
    return plain


def export_merged(model: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``model`` as a plain Hugging Face folder (safetensors + tokenizer + chat template) at ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder")
    network, tokenizer = merged_model(model, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("merged model written to %s", out)
    return out
