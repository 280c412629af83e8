"""Shared fixtures: a tiny random-init Llama (rlft's ``tiny-llama`` alias) loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)`` of ``tiny-llama`` in eval mode (fp32, CPU)."""
    import torch

    from rlft.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", dtype="float32").eval()
    return model, tokenizer
