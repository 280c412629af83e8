"""Segmented attention: packed rows attended one segment at a time, with an optional tree mask per segment.

transformers turns a packed row (restarting ``position_ids``) into one ``[L, L]`` block-diagonal mask for SDPA, and
the SDPA kernels then compute every one of the ``L²`` scores, masked or not: on a CPU row of 1,800 tokens that is
~5× the attention work of the examples attended separately. ``rlft_sdpa`` (a registered transformers attention
implementation, identical to ``sdpa`` unless told otherwise) takes the spans of the row through the forward keyword
``rlft_segments`` and runs SDPA on each span: causal for an ordinary packed example, or under a small boolean mask
for a prompt shared by a chosen and a rejected response (see :func:`rlft.models.scoring.shared_prompt_layout`).
The keyword travels with the layer call, so gradient checkpointing recomputes the same spans.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlft.data.batches import Tokens
from rlft.models.unwrap import causal_lm

SEGMENTED_SDPA = "rlft_sdpa"

# ``(start, end, mask)``: a span of the packed row; ``mask`` is None for plain causal attention, else a boolean
# ``[1, 1, end - start, end - start]`` tensor (True = may attend)
Segment = tuple[int, int, "torch.Tensor | None"]


def _segmented_sdpa(module, query, key, value, attention_mask, rlft_segments=None, **kwargs):
    if rlft_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask, **kwargs)[0]
        for s, e, mask in rlft_segments
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(SEGMENTED_SDPA, _segmented_sdpa)
AttentionMaskInterface.register(SEGMENTED_SDPA, sdpa_mask)


def causal_segments(lengths: list[int]) -> tuple[Segment, ...]:
    """One causal span per packed sequence of the given lengths."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return tuple((s, e, None) for s, e in zip(bounds[:-1], bounds[1:]))


def segmented_inputs(ids: torch.Tensor, positions: torch.Tensor, segments: tuple[Segment, ...]) -> dict:
    """Model keyword arguments for one packed row (``ids``/``positions`` are 1-D) attended span by span."""
    # an all-ones 2-D mask keeps transformers from building the [L, L] packed mask that the segments replace
    return {
        "input_ids": ids[None],
        "position_ids": positions[None],
        "attention_mask": torch.ones_like(ids)[None],
        "rlft_segments": segments,
    }


def forward_inputs(model: torch.nn.Module, tokens: Tokens) -> dict:
    """Model keyword arguments for padded or packed ``tokens`` (packed: segmented where the model allows it)."""
    if tokens.packed and segmented_attention(model):
        segments = causal_segments(tokens.seq_lengths.tolist())
        return segmented_inputs(tokens.input_ids[0], tokens.position_ids[0], segments)
    if tokens.packed:  # transformers reads the restarting positions as example boundaries
        return {"input_ids": tokens.input_ids, "position_ids": tokens.position_ids}
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def _config(model: torch.nn.Module):
    return getattr(causal_lm(model), "config", None)


def segmented_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA model to ``rlft_sdpa`` and report whether it honours ``rlft_segments``.

    Probed once per model (the answer is cached on it): two sequences packed into one row with segments must give
    the logits of the two run separately. Models on other attention implementations (eager, flash-attention with its
    own varlen kernels) or whose layers drop unknown keywords keep their attention and answer False; the caller then
    uses transformers' own packed-row masks.
    """
    cached = getattr(model, "_rlft_segmented", None)
    if cached is not None:
        return cached
    config = _config(model)
    ok = False
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", SEGMENTED_SDPA):
        config._attn_implementation = SEGMENTED_SDPA
        ok = _probe(model)
        if not ok:
            config._attn_implementation = "sdpa"
    model._rlft_segmented = ok
    return ok


@torch.no_grad()
def _probe(model: torch.nn.Module) -> bool:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        first, second = torch.arange(3, 10, device=device)[None], torch.arange(11, 16, device=device)[None]
        separate = torch.cat([model(input_ids=s, use_cache=False).logits for s in (first, second)], dim=1)
        positions = torch.cat([torch.arange(7), torch.arange(5)]).to(device)[None]
        # positions that do not restart would hide a model that ignores the segments
        inputs = segmented_inputs(torch.cat([first, second], 1)[0], positions[0], causal_segments([7, 5]))
        packed = model(**inputs, use_cache=False).logits
        return torch.allclose(separate.float(), packed.float(), atol=1e-3, rtol=1e-3)
    except TypeError:  # a forward without **kwargs
        return False
    finally:
        model.train(was_training)
