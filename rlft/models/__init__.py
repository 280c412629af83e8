"""Model loading: one model string everywhere (hub id, local folder, adapter folder, ``.gguf``, registry alias)."""

from rlft.models.loading import (
    CHATML_FALLBACK,
    LoraSettings,
    ModelRef,
    find_linear_targets,
    is_adapter,
    load_model,
    load_tokenizer,
    resolve_model,
    supports_packing,
)
from rlft.models.registry import REGISTRY, cache_dir, cached_path, pull

__all__ = [
    "CHATML_FALLBACK",
    "REGISTRY",
    "LoraSettings",
    "ModelRef",
    "cache_dir",
    "cached_path",
    "find_linear_targets",
    "is_adapter",
    "load_model",
    "load_tokenizer",
    "pull",
    "resolve_model",
    "supports_packing",
]
