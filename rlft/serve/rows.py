"""The state of a continuous batch: requests, their rows, the running batch, and merging rows into its KV cache.

A :class:`Request` is what a client asked for, split into rows (:class:`Row`, one per sample being generated); a
:class:`Batch` is the rows decoding together with their cache, mask, positions and next-token logits. Rows join a
running batch through :func:`merge_rows`, which right-aligns both caches on a common length. The decode loop that
admits, samples and retires rows is :class:`rlft.serve.continuous.ContinuousEngine`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from rlft.generation.generator import Prompt
from rlft.generation.kv_cache import PreallocatedLayer
from rlft.generation.settings import SamplingSettings
from rlft.serve.engine import DeltaCallback


@dataclass
class Request:
    """One request queued with the engine: its prompts, settings, random stream, and every row of it."""

    prompts: list[Prompt]
    settings: SamplingSettings
    on_delta: DeltaCallback | None
    future: Future
    prompt_tokens: int
    rng: torch.Generator
    encoded: list[list[int]]  # each prompt's token ids
    rows: list[Row] = field(default_factory=list)  # every row of the request, admitted or not
    admitted: int = 0  # rows[:admitted] have been prefilled
    dropped: bool = False  # its rows were dropped because the client went away

    def __post_init__(self) -> None:
        self.rows = [Row(self, p, j) for p in range(len(self.prompts)) for j in range(self.samples_per_prompt)]

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    @property
    def samples_per_prompt(self) -> int:
        """Rows generated per prompt: greedy decoding is deterministic, so its ``n`` choices share one row."""
        return 1 if self.greedy else self.settings.num_samples


@dataclass
class Row:
    """One sample being generated: its tokens so far, what has been streamed of it, and how it ended."""

    request: Request
    prompt: int
    sample: int
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    finish_reason: str | None = None
    text: str = ""

    @property
    def budget(self) -> int:
        return self.request.settings.max_new_tokens - len(self.tokens)


@dataclass
class Batch:
    """The running rows and their state: cache (left-padded to one length), mask, next positions, next logits."""

    rows: list[Row]
    cache: object
    mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, 1]
    logits: torch.Tensor  # [B, V], the distribution each row samples its next token from
    step: object = None  # the lean decoding step over this cache, False where the model needs its forward


def merge_rows(first: Batch, second: Batch) -> Batch:
    """One batch holding both batches' rows, right-aligned on a common cache length.

    Leading columns that no row of ``first`` attends to any more are dropped; the padding added to align the two is
    zero (masked positions must hold finite numbers: a masked NaN still poisons attention's weighted sum). The new
    buffers have room for the longest remaining budget of any row, so no row outgrows them before the next merge.
    """
    keep_from = int(first.mask.any(0).long().argmax())
    first_len, second_len = first.mask.shape[1] - keep_from, second.mask.shape[1]
    length = max(first_len, second_len)
    rows = first.rows + second.rows
    capacity = length + max(row.budget for row in rows)
    b1 = len(first.rows)
    layers = []
    for old, new in zip(first.cache.layers, second.cache.layers, strict=True):
        buffers = []
        for a, b in ((old.keys, new.keys), (old.values, new.values)):
            merged = a.new_zeros((b1 + b.shape[0], *a.shape[1:-2], capacity, a.shape[-1]))
            merged[:b1, ..., length - first_len : length, :] = a[..., keep_from:, :]
            merged[b1:, ..., length - second_len : length, :] = b
            buffers.append(merged)
        layers.append(PreallocatedLayer.from_buffers(*buffers, length))
    first.cache.layers = layers
    mask = first.mask.new_zeros((len(rows), length))
    mask[:b1, length - first_len :] = first.mask[:, keep_from:]
    mask[b1:, length - second_len :] = second.mask
    return Batch(
        rows,
        first.cache,
        mask,
        torch.cat([first.positions, second.positions]),
        torch.cat([first.logits, second.logits]),
    )
