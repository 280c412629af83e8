"""rlft's rollout decoder: each prompt prefilled once for its whole group, finished rows dropped, LoRA merged.

``model.generate`` spends a rollout's time on work a GRPO group does not need: it prefills every prompt
``group_size`` times, keeps decoding rows that already stopped (their tokens are thrown away), and runs peft's two
extra matmuls plus its Python dispatch in every adapted linear layer for every token. :func:`decode` instead

- prefills the unique prompts, then repeats their KV cache ``group_size`` times (the samples of one prompt share
  its prefix exactly, so this is the same computation done once);
- removes a row from the batch and from the cache as soon as it samples a stop token;
- runs the adapter merged into the base weights (:func:`merged_adapter`: a temporary ``W + s·BA`` per adapted
  layer, the original tensors put back afterwards, so training sees bit-identical weights).

Sampling follows ``generate``'s order (temperature, then top-k, then top-p) and draws from torch's global RNG, so
``seed_everything`` makes a rollout reproducible. Positions are counted over real tokens, as the training forward
counts them (:func:`rlft.models.scoring.position_ids_from_mask`), so the rollout's log-probs are the ones the
update recomputes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlft.models.attention import SEGMENTED_SDPA
from rlft.models.scoring import causal_lm, position_ids_from_mask


def sample_tokens(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One token per row of ``logits [B, V]``: greedy for ``temperature == 0``, else a draw from the tempered,
    top-k- then top-p-truncated distribution (the token that crosses the top-p mass is kept, as in ``generate``).

    ``uniforms [B]`` in [0, 1), when given, are the draws (a server gives each request its own seeded stream);
    otherwise they come from torch's global RNG."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1)
        # drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    # inverse-CDF sampling, one uniform per row: torch.multinomial draws an exponential per vocabulary entry, which
    # took ~13 ms of a ~90 ms SmolLM2 decoding step on CPU. float64 keeps u strictly below the total mass, so the
    # first entry whose cumulative mass exceeds u always has non-zero probability.
    cdf = scores.softmax(-1).double().cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], dtype=cdf.dtype, device=cdf.device)
    u = uniforms.to(cdf).reshape(-1, 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _lora_layers(model: torch.nn.Module) -> list | None:
    """The LoRA layers whose adapters can be folded into a plain float weight, or None when something cannot be
    (another tuner, DoRA, quantised base weights, a trained copy of a whole module). Under ZeRO-3 and FSDP2 this
    runs inside ``full_weights``, where every weight is whole on the rank (the parity tests decode merged there)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return None
    if not isinstance(model, PeftModel):
        return None
    layers = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return None
        if not isinstance(module, LoraLayer):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        plain = isinstance(module.get_base_layer(), torch.nn.Linear) and type(weight) is torch.nn.Parameter
        if not plain or not weight.is_floating_point() or module.merged or module.disable_adapters:
            return None
        if any(module.use_dora.get(name, False) for name in module.active_adapters):
            return None
        layers.append(module)
    return layers or None


@contextlib.contextmanager
def merged_adapter(model: torch.nn.Module) -> Iterator[bool]:
    """Inside, every adapted linear layer runs one matmul with ``W + s·BA`` (yields True) — or, when the model's
    adapters cannot be merged exactly, nothing changes (yields False). The original weight tensors are restored, not
    recomputed by subtraction, so merging never drifts the base model."""
    layers = _lora_layers(model)
    if layers is None:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                delta = sum(layer.get_delta_weight(name) for name in active)
                saved.append((layer, weight, weight.data, list(layer.merged_adapters)))
                weight.data = weight.data + delta.to(weight.dtype)
                # peft's own "merged" state: its forward then calls only the base layer
                layer.merged_adapters = active
        yield True
    finally:
        for layer, weight, data, merged in saved:
            weight.data = data
            layer.merged_adapters = merged


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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


def decoding_twin(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain copy of the causal LM in ``dtype`` holding the policy's current weights, LoRA folded in.

    Built once per model (kept outside the module tree, so it is never saved, optimised or sharded), then refreshed
    by one converting copy per call: a bf16 twin of a fp32 policy decodes on half the memory traffic. Sampling from
    it is very slightly off the fp32 policy; the log-probs the update uses still come from the policy itself.
    """
    import transformers
    from peft.tuners.lora import LoraLayer

    lm = causal_lm(model)
    twin = _TWINS.get(model)
    if twin is None or next(twin.parameters()).dtype != dtype:
        # its own config: the policy's attention implementation must not change with the twin's
        config = copy.deepcopy(lm.config)
        sdpa = getattr(config, "_attn_implementation", None) in ("sdpa", SEGMENTED_SDPA)
        attention = {"attn_implementation": UPCAST_SDPA} if sdpa else {}
        twin = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
        twin = twin.to(next(lm.parameters()).device)
        twin.eval().requires_grad_(False)
        _TWINS[model] = twin
    with torch.no_grad(), merged_adapter(model) as merged:
        if not merged and any(isinstance(m, LoraLayer) for m in lm.modules()):
            raise ValueError("this adapter cannot be merged exactly (DoRA, quantised weights or "
                             "modules_to_save): set sampling.decode_dtype: null")  # fmt: skip
        for name, param in twin.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = lm.get_submodule(owner)
            source = module.get_base_layer() if isinstance(module, LoraLayer) else module
            param.copy_(getattr(source, leaf))
    return twin


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes into a buffer of ``capacity`` positions: ``DynamicLayer``
    concatenates a new tensor per token, copying the layer's whole cache once more at every step."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.length = key_states.device, 0
        self.key_buffer = key_states.new_empty((*key_states.shape[:-2], self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:-2], self.capacity, value_states.shape[-1]))
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


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """The model's ``DynamicCache`` with its full-attention layers preallocated (sliding-window layers unchanged)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_argument(lm: torch.nn.Module, cache: DynamicCache) -> dict:
    """``{name: cache}`` for ``lm.forward``: transformers 5.x renamed ``past_key_values`` to ``cache`` (both are
    accepted for a while, the old name with a warning)."""
    return {("cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"): cache}


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    group_size: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample ``group_size`` continuations of each left-padded prompt; returns ``[B * group_size, T]`` token ids
    (rows of one prompt contiguous, padded with ``pad_id`` after each row's stop token, ``T <= max_new_tokens``)."""
    step_options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    lm = causal_lm(model)  # peft's layers live inside it: its wrapper's forward adds only dispatch
    cache = preallocated_cache(lm.config, prompt_ids.shape[1] + max_new_tokens)
    cache_arg = cache_argument(lm, cache)
    logits = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1, **cache_arg).logits[:, -1]  # fmt: skip
    mask = prompt_mask
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits, mask = logits.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    rows = mask.shape[0]
    tokens_out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    active = torch.arange(rows, device=prompt_ids.device)
    positions = mask.sum(-1, keepdim=True)
    stops = torch.tensor(list(stop_ids), device=prompt_ids.device)
    width = 0
    for step in range(max_new_tokens):
        tokens = sample_tokens(logits, **step_options)
        tokens_out[active, step] = tokens
        width = step + 1
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        stopped = torch.isin(tokens, stops)
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, tokens, mask, positions = active[keep], tokens[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        logits = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_arg).logits[:, -1]  # fmt: skip
        positions = positions + 1
    return tokens_out[:, :width]
