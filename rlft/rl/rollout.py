"""Rollouts for online RL, shared by PPO and GRPO: sample responses to a batch of prompts and score their tokens.

One rollout is: the left-padded prompts (optionally each repeated ``group_size`` times), the sampled responses
right-padded after their stop token, the response mask (the stop token included, so the model learns to stop), the
decoded completions, and the per-token log-probs of the rollout policy ("old" log-probs) and of the reference model.

Generation (``backend: rlft``, :mod:`rlft.generation.decoder`) prefills each prompt once for its whole group,
decodes with the KV cache one token per step, drops rows as they stop and runs LoRA merged into the weights;
``backend: hf`` runs ``model.generate`` on the repeated prompts instead (same sampling rules, for models the decoder
cannot serve).
Log-probs come from one separate forward pass (:func:`rlft.rl.logps.token_logps`) with the same position ids the
training forward uses, so the first PPO/GRPO update sees a ratio of exactly 1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from rlft.data.batches import PromptBatch
from rlft.generation.backends import get_sampler
from rlft.generation.decoder import decoding_twin, merged_adapter, release_decoding_twin
from rlft.generation.request import SampleRequest
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.models.hardware import decoding_dtype
from rlft.models.modes import inference
from rlft.models.reference import reference_model
from rlft.models.tokens import pad_token_id, stop_token_ids
from rlft.rl.logps import token_logps


@dataclass
class Rollout:
    """Sampled responses and everything the updates need, one row per sampled sequence.

    Attributes:
        prompt_ids: ``[N, P]`` left-padded prompt tokens.
        prompt_mask: ``[N, P]`` 1 on real prompt tokens.
        response_ids: ``[N, R]`` sampled tokens, padded after the stop token.
        response_mask: ``[N, R]`` 1 on the model's own tokens: up to and including the stop token (right padding);
            in a multi-turn rollout, every model turn (the trained tokens).
        completions: Decoded responses up to (not including) the stop token; other special tokens stay visible.
        prompts: The prompt of each row (message lists or strings), repeated per sample.
        fields: Extra record fields (e.g. ``answer``), one list entry per row.
        finished: ``[N]`` whether the response ended with a stop token (False: cut at ``max_new_tokens``).
        logps: ``[N, R]`` log-probs of the response tokens under the rollout policy.
        ref_logps: ``[N, R]`` the same under the reference model (None when not needed).
        values: ``[N, R]`` value estimates (PPO).
        generation_seconds: Wall time spent in ``generate``.
        row_ids: ``[N]`` each row's index in the whole rollout (a minibatch keeps them).
        group_ids: ``[N]`` the prompt each row was sampled for (rows of one prompt share it).
        rewards: ``[N]`` raw rewards, ``scores``: ``[N]`` after shaping (set by the online core).
        advantages: ``[N, R]`` per-token advantages (a sequence advantage on each of its tokens).
        returns: ``[N, R]`` value targets (PPO).
        kl: ``[N, R]`` per-token KL estimate to the reference at rollout time (when the KL is in the reward).
        metrics: Named scalars of the reward (per-source means and what reward functions report).
        env_mask: ``[N, R]`` 1 on tokens the environment inserted between the model's turns (tool results, turn
            headers) in a multi-turn rollout: attended to, never trained (``response_mask`` is 0 there). None for
            single-turn rollouts.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    completions: list[str]
    prompts: list
    fields: dict[str, list] = field(default_factory=dict)
    finished: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    values: torch.Tensor | None = None
    generation_seconds: float = 0.0
    row_ids: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    env_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = self.response_ids.shape[0]
        if self.row_ids is None:
            self.row_ids = torch.arange(rows, device=self.response_ids.device)
        if self.group_ids is None:  # one sample per prompt unless the sampler says otherwise
            self.group_ids = torch.arange(rows, device=self.response_ids.device)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Prompt, sampled and environment tokens (a multi-turn trajectory is one contiguous, right-padded span)."""
        response = self.response_mask if self.env_mask is None else self.response_mask + self.env_mask
        return torch.cat([self.prompt_mask, response.to(self.prompt_mask.dtype)], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor | Sequence[int]) -> Rollout:
        """The rollout restricted to ``rows`` (a minibatch)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = index.tolist()
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                changes[f.name] = value[index.to(value.device)]
            elif f.name in ("completions", "prompts"):
                changes[f.name] = [value[i] for i in picked]
        changes["fields"] = {k: [v[i] for i in picked] for k, v in self.fields.items()}
        return replace(self, **changes)

    def split(self, size: int) -> list[Rollout]:
        """Consecutive pieces of at most ``size`` rows (micro-batches); the rollout itself when it fits."""
        if size >= len(self):
            return [self]
        return [self.select(list(range(start, min(start + size, len(self))))) for start in range(0, len(self), size)]


def mask_after_stop(response_ids: torch.Tensor, stop_ids: Sequence[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Response mask (ones through the first stop token), the ids with everything after it set to ``pad_id``, and
    whether each row stopped.

    Args:
        response_ids: ``[N, R]`` generated tokens.
        stop_ids: Tokens that end a response.
        pad_id: Filler for positions after the stop token.

    Returns:
        ``(response_ids, response_mask, finished)``.
    """
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_ids), device=response_ids.device))
    # a position is inside the response while no stop token came strictly before it
    stops_before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    mask = (stops_before == 0).long()
    return torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id)), mask, is_stop.any(-1)


def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: SamplingSettings,
    decoder: DecoderSettings = DecoderSettings(),
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` responses per (left-padded) prompt row with the KV cache, rows of one prompt
    contiguous; returns ``(response_ids, response_mask, finished)`` with ``rows * group_size`` rows.

    Sampling runs in the weights' own dtype even inside a bf16-mixed training step's autocast, which would merge
    the adapter in bf16, cast every weight at every decoding step and run the bf16 twin's attention in bf16 (~1.3x
    slower here); the rollout is scored afterwards under the training precision, so the importance ratio still
    starts at 1."""
    with torch.autocast(prompt_ids.device.type, enabled=False):
        return _sample(model, tokenizer, prompt_ids, prompt_mask, settings, decoder, group_size)


def _sample(model, tokenizer, prompt_ids, prompt_mask, settings, decoder, group_size):
    if decoder.backend == "auto":
        raise ValueError("decoder.backend 'auto' is for evaluation and serving; rollouts name one: rlft, hf or vllm")
    stops = stop_token_ids(tokenizer, model, settings.stop_token_ids)
    pad_id = pad_token_id(tokenizer)
    sample = get_sampler(decoder.backend)  # rlft's decoder, model.generate or vLLM: rlft.generation.backends
    request = SampleRequest(
        max_new_tokens=settings.max_new_tokens,
        stop_ids=stops,
        pad_id=pad_id,
        group_size=group_size,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        options=dict(
            lean=decoder.lean_step,
            gpu_memory_utilization=decoder.vllm_gpu_memory_utilization,
            max_model_len=decoder.vllm_max_model_len,
        ),
    )
    # a chunk holds whole groups, so each prompt is still prefilled once
    chunk = max(1, (decoder.batch_size or prompt_ids.shape[0] * group_size) // group_size)
    pieces = []
    network = model
    twin_dtype = decoding_dtype(decoder.decode_dtype, next(model.parameters())) if decoder.backend == "rlft" else None
    if twin_dtype is not None:
        network = decoding_twin(model, twin_dtype)
    # the rlft decoder runs LoRA merged (vLLM merges as it takes the weights; model.generate samples the adapter)
    merge = decoder.backend == "rlft" and decoder.merge_adapter and network is model
    merging = merged_adapter(model) if merge else contextlib.nullcontext()
    with inference(model), merging:
        for start in range(0, prompt_ids.shape[0], chunk):
            ids, mask = prompt_ids[start : start + chunk], prompt_mask[start : start + chunk]
            pieces.append(sample(network, ids, mask, request))
    free = decoder.free_twin if decoder.free_twin is not None else prompt_ids.device.type != "cpu"
    if network is not model and free:
        release_decoding_twin(model)
    width = max(p.shape[1] for p in pieces)
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces]
    return mask_after_stop(torch.cat(padded), stops, pad_id)


def collect_rollout(
    model: torch.nn.Module,
    tokenizer,
    batch: PromptBatch,
    settings: SamplingSettings,
    decoder: DecoderSettings = DecoderSettings(),
    *,
    group_size: int = 1,
    score: bool = True,
    reference: torch.nn.Module | None = None,
    with_reference: bool = False,
    score_batch_size: int | None = None,
    share_prompts: bool = True,
) -> Rollout:
    """Sample ``group_size`` responses per prompt of a ``prompts`` batch and score them.

    Args:
        model: The policy (usually a LoRA ``PeftModel``).
        tokenizer: Its tokenizer.
        batch: A :class:`~rlft.data.batches.PromptBatch` (left-padded ``input_ids``/``attention_mask``, the
            ``prompts``, the rows' other fields in ``fields``, which reach the rollout's ``fields``).
        settings: What is sampled.
        decoder: How it is decoded.
        group_size: Samples per prompt; rows of one prompt are contiguous.
        score: Compute the rollout policy's log-probs (``Rollout.logps``).
        reference: Separate frozen reference model; default is the adapter-disabled policy.
        with_reference: Compute ``Rollout.ref_logps``.
        score_batch_size: Rows per scoring forward (rounded up to whole groups), so the scoring memory does not grow
            with the rollout; default all rows at once.
        share_prompts: Score each prompt once for all of its samples (:func:`rlft.rl.logps.token_logps`).

    Returns:
        The :class:`Rollout`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = next(model.parameters()).device
    unique_ids, unique_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    started = time.perf_counter()
    response_ids, response_mask, finished = generate_responses(
        model, tokenizer, unique_ids, unique_mask, settings, decoder, group_size
    )
    elapsed = time.perf_counter() - started
    prompt_ids = unique_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = unique_mask.repeat_interleave(group_size, dim=0)
    # the text is everything before the stop token, other special tokens included: skipping them would let a policy
    # hide tokens from text-based rewards (e.g. a length reward) while still emitting them
    text_lengths = response_mask.sum(-1) - finished.long()
    completions = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(response_ids, text_lengths)], skip_special_tokens=False
    )
    repeat = lambda values: [v for v in values for _ in range(group_size)]  # noqa: E731
    extra = {k: repeat(v) for k, v in batch.fields.items()}
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        completions=completions,
        prompts=repeat(batch.prompts or [None] * len(batch)),
        fields=extra,
        finished=finished,
        generation_seconds=elapsed,
        group_ids=torch.arange(unique_ids.shape[0], device=device).repeat_interleave(group_size),
    )

    return score_rollout(
        model,
        rollout,
        settings,
        score=score,
        reference=reference,
        with_reference=with_reference,
        score_batch_size=score_batch_size,
        group_size=group_size,
        share_prompts=share_prompts,
    )


def score_rollout(
    model: torch.nn.Module,
    rollout: Rollout,
    settings: SamplingSettings,
    *,
    score: bool = True,
    reference: torch.nn.Module | None = None,
    with_reference: bool = False,
    score_batch_size: int | None = None,
    group_size: int = 1,
    share_prompts: bool = True,
) -> Rollout:
    """Set ``rollout.logps`` (``score``) and ``rollout.ref_logps`` (``with_reference``): teacher-forced over the
    tokens as sampled, in chunks of ``score_batch_size`` rows (rounded up to whole groups)."""

    def logps_under(network: torch.nn.Module) -> torch.Tensor:
        pieces = [
            token_logps(
                network,
                part.input_ids,
                part.attention_mask,
                rollout.response_ids.shape[1],
                temperature=settings.temperature,
                share_prompts=share_prompts,
            )[0]
            for part in rollout.split(scoring_chunk(score_batch_size, group_size))
        ]
        return torch.cat(pieces)

    with inference(model):
        if score:
            rollout.logps = logps_under(model)
        if with_reference:
            with reference_model(model, reference) as ref:
                rollout.ref_logps = logps_under(ref)
    return rollout


def scoring_chunk(rows: int | None, group_size: int) -> int:
    """Rows per scoring forward: ``rows`` rounded up to whole groups (a prompt's samples share one forward), or
    every row when ``rows`` is None."""
    if rows is None:
        return 1 << 62
    return -(-rows // group_size) * group_size


def minibatches(size: int, minibatch_size: int | None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random split of ``range(size)`` into minibatches of ``minibatch_size`` (the last may be smaller)."""
    step = minibatch_size or size
    if step < 1:
        raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
    order = torch.randperm(size, generator=generator)
    return list(order.split(step))
