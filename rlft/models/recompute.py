"""Activation checkpointing modes: ``True`` recomputes whole layers, ``"selective"`` keeps the products' outputs.

Selective checkpointing (``torch.utils.checkpoint``'s policy contexts) saves the outputs of the matrix products and
of attention, the work that dominates a layer, and recomputes the cheap rest in backward: norms, activations,
rotary, residual adds, and products over a short inner dimension such as a LoRA adapter's up-projection (rank ``r``
multiply-adds per output, about as cheap as the elementwise ops, yet as large an output as the base layer's). Those
are where most of a layer's saved bytes come from. The policy runs in Python for every op, so it pays on wide
layers and long rows (a Gemma-3-270M-shaped DPO run: 5.3 → 4.5 GB for ~3 % of step time) and not on small
models with short batches, where that dispatch costs as much as full recomputation (README, Performance).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CheckpointMode = bool | Literal["selective"]

# a product whose inner dimension is this short costs about as much per output as elementwise ops: recompute it
CHEAP_INNER = 64

_aten = torch.ops.aten
_PRODUCTS = {  # op -> index of its left operand, whose last dimension is the one summed over
    _aten.mm.default: 0,
    _aten.bmm.default: 0,
    _aten.addmm.default: 1,
    _aten.baddbmm.default: 1,
}
_ATTENTION = {
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
}


def _keep(op, args) -> bool:
    if op in _ATTENTION:
        return True
    left = _PRODUCTS.get(op)
    return left is not None and args[left].shape[-1] > CHEAP_INNER


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _keep(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: CheckpointMode) -> dict:
    """Arguments for ``torch.utils.checkpoint.checkpoint`` (transformers' ``gradient_checkpointing_kwargs``)."""
    if mode not in (True, "selective"):
        raise ValueError(f"gradient_checkpointing must be true, false or 'selective', got {mode!r}")
    # non-reentrant: gradients still reach LoRA weights when the frozen embeddings give inputs without
    # requires_grad (the "element 0 of tensors does not require grad" failure of the reentrant variant)
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
    return kwargs
