"""One decoding step of a Llama-family model without the framework around it.

At decoding shapes a SmolLM2 step (30 layers, bf16, batch 16) spent ~40 % of its time outside its matmuls: the
modeling code runs some 160 small tensor operations per layer (mask building, per-call shape bookkeeping, dtype
round trips in every norm, cache bookkeeping), each a few microseconds of dispatch on a CPU. :func:`lean_step` runs
the same arithmetic as transformers' Llama, Mistral (no sliding window), Qwen2 and Qwen3 layers for one new token
per row, reading the model's own weights, rotary embedding and preallocated KV cache — about 25 operations per
layer, with the q/k/v and the gate/up projections each one matmul where :func:`join_projections` laid their weights
out back to back (no copy; otherwise one matmul per projection). Other architectures, and weights it cannot read as
plain tensors (quantised, sharded, an unmerged adapter), get ``None`` and decode through the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlft.generation.kv_cache import UPCAST_SDPA, PreallocatedLayer
from rlft.models.unwrap import causal_lm

LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _plain(module: torch.nn.Module) -> torch.nn.Module | None:
    """The ``nn.Linear`` computing ``module``'s output from its weight alone (peft's base layer once the adapter is
    merged), or None."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = ()  # noqa: N806
    if isinstance(module, LoraLayer):
        live = [name for name in module.active_adapters if name in module.lora_A]
        if live and not module.merged and not module.disable_adapters:
            return None
        module = module.get_base_layer()
    if type(module) is not torch.nn.Linear or type(module.weight) is not torch.nn.Parameter:
        return None
    return module if module.weight.is_floating_point() else None


class _Projection:
    """Several linear layers applied to one input, outputs concatenated: one matmul when their weights lie back to
    back in one storage (see :func:`join_projections`), else one per layer (never a copy of the weights)."""

    def __init__(self, layers: list[torch.nn.Linear]) -> None:
        self.layers = layers
        first = layers[0].weight
        offset, adjacent = first.storage_offset(), True
        for layer in layers:
            weight = layer.weight
            adjacent &= weight.is_contiguous() and weight.storage_offset() == offset
            adjacent &= weight.shape[1:] == first.shape[1:] and weight.dtype == first.dtype
            adjacent &= weight.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            offset += weight.numel()
        self.weight = None
        if adjacent:
            rows = sum(layer.weight.shape[0] for layer in layers)
            self.weight = first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
            biases = [layer.bias for layer in layers]
            self.bias = None if biases[0] is None else torch.cat(biases)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        return torch.cat([F.linear(x, layer.weight, layer.bias) for layer in self.layers], dim=-1)


def join_projections(model: torch.nn.Module) -> None:
    """Lay each layer's q/k/v and gate/up weights back to back in one tensor, so :func:`lean_step` multiplies by
    them at once without copying (the parameters become views of it; for a model rlft owns, such as the decoding
    twin)."""
    lm = causal_lm(model)
    if lm.config.model_type not in LEAN_MODEL_TYPES:
        return
    for block in lm.model.layers:
        for owner, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            layers = [getattr(owner, name) for name in names]
            if any(type(layer) is not torch.nn.Linear for layer in layers):
                continue
            joined = torch.cat([layer.weight.detach() for layer in layers])
            for layer, part in zip(layers, joined.split([layer.weight.shape[0] for layer in layers])):
                layer.weight = torch.nn.Parameter(part, requires_grad=layer.weight.requires_grad)


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    # transformers' RMSNorm arithmetic: normalise in fp32, round to the input dtype, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def lean_step(model: torch.nn.Module, cache) -> Callable | None:
    """``step(tokens [B], mask [B, L], positions [B, 1]) -> logits [B, V]`` for one new token per row, writing into
    ``cache`` (a :func:`rlft.generation.kv_cache.preallocated_cache` the model's prefill filled), or None where this
    model must decode through its own forward."""
    lm = causal_lm(model)
    config = lm.config
    base = getattr(lm, "model", None)
    if config.model_type not in LEAN_MODEL_TYPES or base is None or not hasattr(base, "rotary_emb"):
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or lm.training:
        return None
    if not all(type(layer) is PreallocatedLayer for layer in cache.layers):
        return None
    blocks = []
    for block in base.layers:
        attn, mlp = block.self_attn, block.mlp
        linears = [_plain(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [_plain(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(layer is None for layer in linears):
            return None
        q, k, v, o, gate, up, down = linears
        matrices = (_Projection([q, k, v]), o, _Projection([gate, up]), down)
        qk_norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None
        blocks.append((block.input_layernorm, block.post_attention_layernorm, matrices, qk_norms, attn.scaling))
    head = _plain(lm.lm_head)
    if head is None or type(base.embed_tokens) is not torch.nn.Embedding:
        return None
    dtype = base.embed_tokens.weight.dtype  # weights stored narrower (rlft.models.lowp) need the hooked forward
    if any(m.weight.dtype != dtype for m in base.modules() if isinstance(m, torch.nn.Linear)):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    groups = q_heads // kv_heads
    # the bf16 decoding twin attends in fp32 (rlft.generation.kv_cache._upcast_sdpa)
    upcast = getattr(config, "_attn_implementation", None) == UPCAST_SDPA

    def step(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        h = base.embed_tokens(tokens)
        cos, sin = base.rotary_emb(h, positions)  # [B, 1, head_dim]: the 1 broadcasts over heads
        allowed = mask.bool()[:, None, None, :]
        for (norm_in, norm_post, matrices, qk_norms, scaling), layer in zip(blocks, cache.layers):
            qkv, o, gate_up, down = matrices
            x = _rms(h, norm_in)
            qs, ks, vs = qkv(x).view(rows, -1, head_dim).split([q_heads, kv_heads, kv_heads], 1)
            if qk_norms is not None:
                qs, ks = _rms(qs, qk_norms[0]), _rms(ks, qk_norms[1])
            qs, ks = _rotate(qs, cos, sin), _rotate(ks, cos, sin)
            keys, values = layer.update(ks[:, :, None], vs[:, :, None])
            # grouped-query attention for one query token: a kv head's query heads become its query "positions"
            qs = qs.view(rows, kv_heads, groups, head_dim)
            if upcast and qs.device.type == "cpu":
                out = F.scaled_dot_product_attention(
                    qs.float(), keys.float(), values.float(), attn_mask=allowed, scale=scaling
                ).to(qs.dtype)
            else:
                out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=allowed, scale=scaling)
            h = h + _linear(o, out.reshape(rows, -1))
            x = _rms(h, norm_post)
            gate_states, up_states = gate_up(x).chunk(2, dim=-1)
            h = h + _linear(down, F.silu(gate_states) * up_states)
        return _linear(head, _rms(h, base.norm))

    return step
