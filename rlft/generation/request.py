"""What one call of a sampling backend is asked for: :class:`SampleRequest`, and the signature every backend shares.

A backend (:mod:`rlft.generation.backends`) takes the model, left-padded prompt ids and their mask, and a request;
it returns ``[B * group_size, T]`` sampled token ids (rows of one prompt contiguous, padded with ``pad_id`` after a
row's stop token, ``T <= max_new_tokens``). Rollouts, evaluation and serving all ask through this one type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# called as on_token(row, token id) for every token a backend samples, rows numbered as in its output
RowTokenCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SampleRequest:
    """One sampling call.

    Args:
        max_new_tokens: Tokens sampled at most per row.
        stop_ids: Token ids that end a row (kept in the output, followed by ``pad_id``).
        pad_id: Fills a row after its stop token.
        group_size: Samples per prompt; rows of one prompt are contiguous.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass.
        top_k: Sample among the k most likely tokens (0 disables); None keeps the backend's default (for
            ``model.generate`` the model's generation config, which is what evaluation has always sampled with).
        seed: Seed of vLLM's sampler; None draws one from torch's RNG (the torch backends always draw from it).
        stop_strings: Strings that end a row early where the backend can stop on them (``hf``, ``vllm``); the text
            is cut at them by the caller either way.
        tokenizer: Needed with ``stop_strings`` by ``model.generate``.
        on_token: Sees every sampled token as ``(row, token id)``: per step for the torch backends (a finished
            row keeps receiving pads until its batch ends), per row after generation for vLLM.
        options: What only one backend reads: ``lean`` (rlft decoder), ``engine``, ``gpu_memory_utilization``,
            ``max_model_len`` (vLLM).
    """

    max_new_tokens: int
    stop_ids: Sequence[int]
    pad_id: int
    group_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    tokenizer: Any = None
    on_token: RowTokenCallback | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


class SampleFn(Protocol):
    """The one signature of a sampling backend (see the module docstring)."""

    def __call__(
        self, model: torch.nn.Module | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, request: SampleRequest
    ) -> torch.Tensor: ...
