"""The decoder's KV cache: preallocated full-attention layers, and fp32 attention for bf16 models on a CPU."""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

UPCAST_SDPA = "rlft_upcast_sdpa"


def _upcast_sdpa(module, query, key, value, attention_mask, **kwargs):
    # CPU SDPA in bf16 ran ~4x slower than in fp32 at decoding shapes (0.5 ms of a 49 ms step per layer); the
    # matmuls stay in bf16, only the small attention over the cache runs in fp32
    if query.device.type != "cpu" or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(UPCAST_SDPA, _upcast_sdpa)
AttentionMaskInterface.register(UPCAST_SDPA, sdpa_mask)


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes into a buffer of ``capacity`` positions: ``DynamicLayer``
    concatenates a new tensor per token, copying the layer's whole cache once more at every step."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.capacity, self.length, self.buffer_dtype = capacity, 0, dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.length = key_states.device, 0
        for name, states in (("key_buffer", key_states), ("value_buffer", value_states)):
            shape = (*states.shape[:-2], self.capacity, states.shape[-1])
            setattr(self, name, states.new_empty(shape, dtype=self.buffer_dtype or states.dtype))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.capacity} allocated")
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    @classmethod
    def from_buffers(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> PreallocatedLayer:
        """A layer over existing ``[B, H, capacity, D]`` buffers whose first ``length`` positions are filled."""
        layer = cls(key_buffer.shape[-2])
        layer.lazy_initialization(key_buffer[..., :0, :], value_buffer[..., :0, :])
        layer.key_buffer, layer.value_buffer, layer.length = key_buffer, value_buffer, length
        layer._views()
        return layer

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def _rows(self, pick) -> None:
        if self.get_seq_length() > 0:
            self.key_buffer, self.value_buffer = pick(self.key_buffer), pick(self.value_buffer)
            self._views()

    def _views(self) -> None:
        self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]


def preallocated_cache(config, capacity: int, dtype: torch.dtype | None = None) -> DynamicCache:
    """The model's ``DynamicCache`` with its full-attention layers preallocated (sliding-window layers unchanged),
    keys and values held in ``dtype`` (default: the model's)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(capacity, dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def cache_argument(lm: torch.nn.Module, cache: DynamicCache) -> dict:
    """``{name: cache}`` for ``lm.forward``: transformers 5.x renamed ``past_key_values`` to ``cache`` (both are
    accepted for a while, the old name with a warning)."""
    return {("cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"): cache}
