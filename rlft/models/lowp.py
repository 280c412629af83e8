"""Frozen linear weights stored in the autocast dtype under mixed precision, exactly.

Under ``bf16-mixed`` autocast runs every product in bf16, casting its fp32 weight at each call — and it caches the
cast only for weights that require grad, so a LoRA run reads its whole frozen fp32 base and writes a bf16 copy of it
at every forward, every checkpointed recomputation and every reference forward, and keeps those copies alive for
backward. Where a frozen weight is exactly representable in bf16 (checkpoints published in bf16: the fp32 load only
widened them), storing it in bf16 is lossless and makes autocast's cast the identity: every number computed under
autocast is unchanged, the per-call casts disappear and the base takes half the memory.

Outside autocast (an evaluation callback, sampling without a decoding twin, user code) a stored layer casts its input
to the stored dtype and its output back, i.e. computes the product as autocast would. :func:`full_precision_linears`
restores the original weights for a block that must compute in the original precision; :func:`restore_linears` puts
them back for good (before an export). Tied weights (an LM head sharing the input embedding) are left alone: the
embedding lookup would otherwise return bf16 rows and put the residual stream in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rlft.models.memory import return_freed_memory

_STORED = "_rlft_stored_dtype"  # on each converted layer: the dtype it had (its outputs are cast back to it)


def _cast_input(layer: torch.nn.Linear, args: tuple) -> tuple | None:
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) or x.dtype == layer.weight.dtype:
        return None
    return (x.to(layer.weight.dtype), *args[1:])


def _cast_output(layer: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    original = getattr(layer, _STORED)
    if torch.is_autocast_enabled(output.device.type) or output.dtype == original:
        return None
    return output.to(original)


def _candidates(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Linear]:
    """Plain linear layers whose weight and bias are frozen fp32/fp64 tensors not shared with another kind of
    module (a tied embedding)."""
    shared = {id(p) for m in module.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    seen: set[int] = set()
    for layer in module.modules():
        if type(layer) is not torch.nn.Linear or hasattr(layer, _STORED):
            continue
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        if any(type(p) is not torch.nn.Parameter or p.requires_grad or p.is_meta for p in params):
            continue
        if any(id(p) in shared or id(p) in seen for p in params):
            continue
        if any(not p.is_floating_point() or p.dtype.itemsize <= dtype.itemsize for p in params):  # already narrow
            continue
        seen.update(id(p) for p in params)
        yield layer


def _representable(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(tensor.to(dtype).to(tensor.dtype), tensor)


def store_linears(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """Store every frozen linear weight (and bias) of ``module`` that ``dtype`` represents exactly in ``dtype``.

    Returns ``(converted, skipped)`` layer counts (skipped: some value would round). Idempotent.
    """
    converted = skipped = 0
    for layer in list(_candidates(module, dtype)):
        if all(_representable(p, dtype) for p in _params(layer)):
            _store(layer, dtype)
            converted += 1
        else:
            skipped += 1
    if converted:
        return_freed_memory(collect_garbage=False)  # the wide fp32 weights just freed
    return converted, skipped


def stored_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if hasattr(m, _STORED)]


def restore_linears(module: torch.nn.Module) -> dict[torch.nn.Linear, torch.dtype]:
    """Undo :func:`store_linears` (exactly: the stored values were representable); returns each restored layer's
    stored dtype."""
    return {layer: _restore(layer) for layer in stored_linears(module)}


@contextlib.contextmanager
def full_precision_linears(module: torch.nn.Module) -> Iterator[None]:
    """Inside, the layers :func:`store_linears` converted hold their original weights again (e.g. for an evaluation
    that must compute as the unconverted model would); stored again on exit."""
    restored = restore_linears(module)
    try:
        yield
    finally:
        for layer, dtype in restored.items():
            _store(layer, dtype)


def _params(layer: torch.nn.Linear) -> list[torch.nn.Parameter]:
    return [p for p in (layer.weight, layer.bias) if p is not None]


@torch.no_grad()
def _store(layer: torch.nn.Linear, dtype: torch.dtype) -> None:
    setattr(layer, _STORED, layer.weight.dtype)
    for p in _params(layer):
        p.data = p.data.to(dtype)
    layer._rlft_hooks = (layer.register_forward_pre_hook(_cast_input), layer.register_forward_hook(_cast_output))


@torch.no_grad()
def _restore(layer: torch.nn.Linear) -> torch.dtype:
    stored = layer.weight.dtype
    for p in _params(layer):
        p.data = p.data.to(getattr(layer, _STORED))
    for handle in layer._rlft_hooks:
        handle.remove()
    del layer._rlft_hooks
    delattr(layer, _STORED)
    return stored
