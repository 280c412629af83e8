"""The one way to reach the causal LM inside whatever wraps it (a PEFT ``PeftModel``; a plain model is itself)."""

from __future__ import annotations

import torch


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (``get_base_model``), else ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
