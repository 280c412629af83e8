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
from typing import Literal

import torch

from rlft.generation.backends import get_sampler
from rlft.generation.decoder import decoding_twin, merged_adapter, release_decoding_twin
from rlft.generation.request import SampleRequest
from rlft.models.hardware import decoding_dtype
from rlft.models.modes import inference
from rlft.models.reference import reference_model
from rlft.models.tokens import pad_token_id, stop_token_ids
from rlft.rl.logps import token_logps


@dataclass(frozen=True)  # frozen: a default instance is shared by every signature that uses it
class RolloutSettings:
    """How responses are sampled.

    Args:
        max_new_tokens: Longest response in tokens; responses cut here have no stop token.
        temperature: Sampling temperature (log-probs are taken at the same temperature); 0 means greedy.
        top_p: Nucleus sampling mass.
        top_k: Sample among the k most likely tokens only; 0 disables.
        stop_token_ids: Extra token ids that end a response, besides EOS and the template's end-of-turn token.
        generation_batch_size: Sequences generated at once (chunks a large rollout to bound memory; rounded down to
            whole groups of ``group_size``, at least one); default all.
        backend: ``rlft`` (shared prefill, finished rows dropped, merged LoRA), ``hf`` (``model.generate``),
            ``vllm`` (a vLLM engine colocated on the training GPU, the current weights pushed before every rollout:
            :mod:`rlft.generation.vllm`; needs vLLM and a CUDA GPU, one process or DDP), or any backend registered
            with :func:`rlft.generation.backends.register_sampler` or named as ``module:function``.
        merge_adapter: With ``backend: rlft``, decode with the LoRA folded into a temporary copy of the adapted
            weights (one matmul per layer instead of three; costs one copy of those weights during the rollout).
        decode_dtype: With ``backend: rlft``, sample from a copy of the policy in this dtype (e.g. ``bfloat16`` for
            a fp32 policy on a CPU with bf16 matmuls: about half the memory traffic per token), refreshed from the
            policy before every rollout; samples are then very slightly off-policy (as with vLLM in bf16), the
            log-probs of the update still come from the policy. ``auto``: bf16 for a fp32 policy where the hardware
            runs bf16 natively (:func:`rlft.models.hardware.fast_bf16`), none elsewhere (and with other backends).
            Default: the policy itself.
        free_twin: With ``decode_dtype``, free the twin's weights after each rollout (the refresh before the next one
            rewrites them whole), so they are not held through the update. Default: on an accelerator, where freeing
            and reallocating is a cache hit; not on a CPU, where the pages fault back in (SmolLM2 GRPO here: peak RSS
            2.20 -> 2.02 GB but steps 3.98 -> 4.44 s).
        lean_step: With ``backend: rlft``, decode Llama, Mistral, Qwen2 and Qwen3 models token by token without the
            modeling code (:func:`rlft.generation.lean_step.lean_step`: the same arithmetic, q/k/v and gate/up each one
            matmul); other models always step through their forward.
        share_prompts: Score rollouts and run the updates with each prompt once for all of its samples and no
            padding (:mod:`rlft.rl.layout`; the same log-probs up to float rounding); needs segmented attention
            (SDPA models), others use the padded layout.
        vllm_gpu_memory_utilization: With ``backend: vllm``, the share of the GPU vLLM takes (weights + KV cache).
        vllm_max_model_len: With ``backend: vllm``, longest prompt + response vLLM plans for (default: the
            model's context).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    generation_batch_size: int | None = None
    backend: str = "rlft"
    merge_adapter: bool = True
    decode_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    free_twin: bool | None = None
    lean_step: bool = True
    share_prompts: bool = True
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        get_sampler(self.backend)  # a registered name or `module:function`; the error lists the registered ones
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.decode_dtype not in (None, "auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"decode_dtype must be null, auto, bfloat16, float16 or float32: {self.decode_dtype!r}")
        if self.decode_dtype not in (None, "auto") and self.backend != "rlft":  # model.generate samples the policy
            raise ValueError(f"decode_dtype={self.decode_dtype!r} needs backend 'rlft', got {self.backend!r}")
        if self.free_twin is not None and self.decode_dtype is None:  # no twin to free or keep
            raise ValueError(
                f"free_twin={self.free_twin} needs a decode_dtype (a decoding twin); set it or drop free_twin"
            )


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
    settings: RolloutSettings,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` responses per (left-padded) prompt row with the KV cache, rows of one prompt
    contiguous; returns ``(response_ids, response_mask, finished)`` with ``rows * group_size`` rows.

    Sampling runs in the weights' own dtype even inside a bf16-mixed training step's autocast, which would merge
    the adapter in bf16, cast every weight at every decoding step and run the bf16 twin's attention in bf16 (~1.3x
    slower here); the rollout is scored afterwards under the training precision, so the importance ratio still
    starts at 1."""
    with torch.autocast(prompt_ids.device.type, enabled=False):
        return _sample(model, tokenizer, prompt_ids, prompt_mask, settings, group_size)


def _sample(model, tokenizer, prompt_ids, prompt_mask, settings, group_size):
    stops = stop_token_ids(tokenizer, model, settings.stop_token_ids)
    pad_id = pad_token_id(tokenizer)
    sample = get_sampler(settings.backend)  # rlft's decoder, model.generate or vLLM: rlft.generation.backends
    request = SampleRequest(
        max_new_tokens=settings.max_new_tokens,
        stop_ids=stops,
        pad_id=pad_id,
        group_size=group_size,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        options=dict(
            lean=settings.lean_step,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
        ),
    )
    # a chunk holds whole groups, so each prompt is still prefilled once
    chunk = max(1, (settings.generation_batch_size or prompt_ids.shape[0] * group_size) // group_size)
    pieces = []
    decoder = model
    twin_dtype = decoding_dtype(settings.decode_dtype, next(model.parameters())) if settings.backend == "rlft" else None
    if twin_dtype is not None:
        decoder = decoding_twin(model, twin_dtype)
    # the rlft decoder runs LoRA merged (vLLM merges as it takes the weights; model.generate samples the adapter)
    merge = settings.backend == "rlft" and settings.merge_adapter and decoder is model
    merging = merged_adapter(model) if merge else contextlib.nullcontext()
    with inference(model), merging:
        for start in range(0, prompt_ids.shape[0], chunk):
            ids, mask = prompt_ids[start : start + chunk], prompt_mask[start : start + chunk]
            pieces.append(sample(decoder, ids, mask, request))
    free = settings.free_twin if settings.free_twin is not None else prompt_ids.device.type != "cpu"
    if decoder is not model and free:
        release_decoding_twin(model)
    width = max(p.shape[1] for p in pieces)
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces]
    return mask_after_stop(torch.cat(padded), stops, pad_id)


def collect_rollout(
    model: torch.nn.Module,
    tokenizer,
    batch: dict,
    settings: RolloutSettings,
    *,
    group_size: int = 1,
    score: bool = True,
    reference: torch.nn.Module | None = None,
    with_reference: bool = False,
    score_batch_size: int | None = None,
) -> Rollout:
    """Sample ``group_size`` responses per prompt of a ``prompts`` batch and score them.

    Args:
        model: The policy (usually a LoRA ``PeftModel``).
        tokenizer: Its tokenizer.
        batch: A ``PreferenceDataModule`` prompts batch: ``prompt_input_ids``/``prompt_attention_mask`` (left
            padded), ``prompt`` and any extra fields as lists.
        settings: Sampling settings.
        group_size: Samples per prompt; rows of one prompt are contiguous.
        score: Compute the rollout policy's log-probs (``Rollout.logps``).
        reference: Separate frozen reference model; default is the adapter-disabled policy.
        with_reference: Compute ``Rollout.ref_logps``.
        score_batch_size: Rows per scoring forward (rounded up to whole groups), so the scoring memory does not grow
            with the rollout; default all rows at once.

    Returns:
        The :class:`Rollout`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = next(model.parameters()).device
    unique_ids, unique_mask = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
    started = time.perf_counter()
    response_ids, response_mask, finished = generate_responses(
        model, tokenizer, unique_ids, unique_mask, settings, group_size
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
    extra = {k: repeat(v) for k, v in batch.items() if not torch.is_tensor(v) and k != "prompt"}
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        completions=completions,
        prompts=repeat(batch.get("prompt", [None] * prompt_ids.shape[0])),
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
    )


def score_rollout(
    model: torch.nn.Module,
    rollout: Rollout,
    settings: RolloutSettings,
    *,
    score: bool = True,
    reference: torch.nn.Module | None = None,
    with_reference: bool = False,
    score_batch_size: int | None = None,
    group_size: int = 1,
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
                share_prompts=settings.share_prompts,
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
