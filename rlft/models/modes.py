"""Switching a network between training and inference behaviour, one implementation for training and eval."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """No gradients and eval mode (dropout off, so the sampled and scored policy are the same), then restore."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def disable_dropout(module: torch.nn.Module) -> None:
    """Zero every dropout so a policy and its reference (or its rollout-time self) are the same deterministic
    network, as TRL does; log-prob ratios and DPO margins then compare like with like."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
