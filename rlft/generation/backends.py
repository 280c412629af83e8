"""The registry of sampling backends: one name per way to sample, each a function with one signature.

=========  ============================================================================================
``rlft``   rlft's decoder (:func:`rlft.generation.decoder.decoder_sample`): shared prefill per group,
           finished rows dropped, lean step for Llama-family models
``hf``     ``model.generate`` on the repeated prompts (:func:`hf_sample`), for any model transformers can run
``vllm``   a vLLM engine in this process (:func:`rlft.generation.vllm.vllm_sample`); needs vLLM and a CUDA GPU
=========  ============================================================================================

Every backend is called as ``sample(model, prompt_ids, prompt_mask, request)`` with left-padded prompts and a
:class:`~rlft.generation.request.SampleRequest`, and returns ``[B * group_size, T]`` token ids padded after each
row's stop token. Rollouts (:func:`rlft.rl.rollout.generate_responses`) and the evaluation and serving
:class:`~rlft.generation.generator.Generator` pick theirs by name through :func:`get_sampler`, which also takes a
``module:function`` of your own; :func:`register_sampler` adds a name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlft.generation.decoder import decoder_sample
from rlft.generation.request import SampleFn, SampleRequest
from rlft.generation.vllm import vllm_sample
from rlft.registry import resolve


class _RowStreamer:
    """A ``generate`` streamer that forwards each step's new tokens, row by row, to ``on_token(row, token)``."""

    def __init__(self, on_token: Callable[[int, int], None]) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.on_token(row, token)

    def end(self) -> None:
        pass


def hf_sample(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, request: SampleRequest
) -> torch.Tensor:
    """The ``hf`` sampling backend: ``model.generate`` with the KV cache on each prompt repeated ``group_size``
    times (generate's own ``num_return_sequences`` repeats it the same way, but refuses greedy decoding)."""
    sampling = request.temperature > 0
    options = dict(temperature=request.temperature, top_p=request.top_p)
    if request.top_k is not None:
        options["top_k"] = request.top_k
    extra: dict = {}
    if request.stop_strings:
        extra.update(stop_strings=list(request.stop_strings), tokenizer=request.tokenizer)
    if request.on_token is not None:
        extra["streamer"] = _RowStreamer(request.on_token)
    ids, mask = prompt_ids, prompt_mask
    if request.group_size > 1:
        ids, mask = ids.repeat_interleave(request.group_size, dim=0), mask.repeat_interleave(request.group_size, dim=0)
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=request.max_new_tokens,
        do_sample=sampling,
        use_cache=True,
        pad_token_id=request.pad_id,
        eos_token_id=list(request.stop_ids),
        **(options if sampling else {}),
        **extra,
    )
    return generated[:, ids.shape[1] :]


SAMPLERS: dict[str, SampleFn] = {"rlft": decoder_sample, "hf": hf_sample, "vllm": vllm_sample}


def register_sampler(name: str) -> Callable[[SampleFn], SampleFn]:
    """Decorator: make ``name`` select this backend everywhere a backend is named. Give the function
    ``batches_itself = True`` when it takes every prompt of a generator call at once (as vLLM does)."""

    def add(sample: SampleFn) -> SampleFn:
        SAMPLERS[name] = sample
        return sample

    return add


def get_sampler(name: str | SampleFn) -> SampleFn:
    """The backend registered as ``name`` (or the ``module:function`` it names, or the function itself).

    Raises:
        ValueError: naming the registered backends when ``name`` is none of them.
    """
    return resolve(name, SAMPLERS, "sampling backend")


def batches_itself(sample: SampleFn) -> bool:
    """The backend takes every prompt of a call at once (it batches on its own) instead of ``batch_size`` each."""
    return bool(getattr(sample, "batches_itself", False))
