"""Selective activation checkpointing: products and attention kept, the cheap rest recomputed, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlft.models.recompute as recompute
from rlft.models import LoraSettings, load_model


class ProductCounter(TorchDispatchMode):
    """Counts the matrix products (by inner dimension) and the elementwise ops that run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.products: dict[int, int] = {}
        self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        left = recompute._PRODUCTS.get(func)
        if left is not None:
            inner = args[left].shape[-1]
            self.products[inner] = self.products.get(inner, 0) + 1
        elif func in (torch.ops.aten.mul.Tensor, torch.ops.aten.rsqrt.default, torch.ops.aten.silu.default):
            self.elementwise += 1
        return func(*args, **(kwargs or {}))


def _backward_work(mode, monkeypatch) -> tuple[ProductCounter, list[torch.Tensor], float]:
    # tiny-llama's layers are 64 wide: call a product "cheap" below 8 so the rank-4 adapter's up-projection is one
    monkeypatch.setattr(recompute, "CHEAP_INNER", 7)
    torch.manual_seed(0)
    model = load_model("tiny-llama", lora=LoraSettings(r=4, dropout=0.0), gradient_checkpointing=mode).train()
    # checkpointing makes the embeddings' output require grad; so does the baseline, for the same backward graph
    model.enable_input_require_grads()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    loss = model(input_ids=ids, labels=ids).loss
    counter = ProductCounter()
    with counter:
        loss.backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
    return counter, grads, loss.item()


def test_selective_checkpointing_recomputes_only_the_cheap_ops_and_keeps_gradients(monkeypatch):
    plain, plain_grads, plain_loss = _backward_work(False, monkeypatch)
    full, full_grads, full_loss = _backward_work(True, monkeypatch)
    selective, selective_grads, selective_loss = _backward_work("selective", monkeypatch)

    assert plain_loss == full_loss == selective_loss
    for grads in (full_grads, selective_grads):
        for got, want in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    def costly(counter):  # products over more than the cheap inner dimension
        return sum(n for inner, n in counter.products.items() if inner > 7)

    # full checkpointing runs every layer's forward products again; selective runs none of the costly ones again,
    # only the adapters' rank-4 up-projections and the elementwise ops (norms, activations, rotary)
    assert costly(full) > costly(plain)
    assert costly(selective) == costly(plain)
    assert selective.products.get(4, 0) > plain.products.get(4, 0)
    assert selective.elementwise > plain.elementwise


def test_a_checkpointing_mode_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="true, false or 'selective'"):
        load_model("tiny-llama", gradient_checkpointing="sometimes")
