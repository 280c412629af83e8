"""The two settings types every sampler shares: :class:`SamplingSettings` (WHAT is sampled) and
:class:`DecoderSettings` (HOW it is decoded).

Online RL rollouts (YAML ``model.sampling:`` and ``model.decoder:``), evaluation, the evaluation callbacks, the
pipeline and serving all take these two; each entry point keeps its own defaults (see
:class:`SamplingSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlft.generation.backends import get_sampler

DECODE_DTYPES = (None, "auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)  # frozen: a default instance is shared by every signature that uses it
class SamplingSettings:
    """What is sampled.

    Defaults: the field defaults are those of evaluation and serving (greedy, 256 tokens). Online RL methods default
    to :data:`ONLINE_SAMPLING` instead (temperature 1.0, 64 tokens, no top-k), and a ``model.sampling:`` block in a
    config overrides only the fields it names on top of that. Evaluation commands and callbacks pass their own
    ``max_new_tokens`` (and ``temperature`` where they sample).

    Args:
        max_new_tokens: Longest sample in tokens; samples cut here have no stop token.
        temperature: Sampling temperature (rollout log-probs are taken at the same temperature); 0 means greedy.
        top_p: Nucleus sampling mass (sampling only).
        top_k: Sample among the k most likely tokens only; 0 disables; None keeps the backend's default (for
            ``model.generate`` and rlft's decoder the model's generation config, what evaluation has always used).
        num_samples: Samples per prompt of evaluation and serving (``n`` of pass@k); online methods sample their
            ``group_size`` per prompt instead and refuse anything but 1 here.
        stop: Strings that end a sample; the text is cut before the first one (evaluation and serving; rollouts
            refuse them and stop on ``stop_token_ids``).
        stop_token_ids: Extra token ids that end a sample, besides EOS and the template's end-of-turn token.
        seed: Seed of evaluation's and serving's sampling, so they are reproducible; rollouts draw from the
            training run's random stream (``seed_everything``) instead.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables) or null, got {self.top_k}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


#: what online RL methods sample with unless ``model.sampling`` says otherwise
ONLINE_SAMPLING = SamplingSettings(max_new_tokens=64, temperature=1.0, top_k=0)


@dataclass(frozen=True)
class DecoderSettings:
    """How samples are decoded.

    Args:
        backend: ``rlft`` (shared prefill, finished rows dropped, merged LoRA), ``hf`` (``model.generate``),
            ``vllm`` (a vLLM engine in this process: for online methods colocated on the training GPU, the current
            weights pushed before every rollout, :mod:`rlft.generation.vllm`; needs vLLM and a CUDA GPU), any
            backend registered with :func:`rlft.generation.backends.register_sampler` or named as
            ``module:function``, or, for evaluation and serving only, ``auto``: vLLM when it is usable and the
            model is a folder on disk, else ``hf`` (the :class:`~rlft.generation.generator.Generator`'s default).
        batch_size: Sequences decoded at once, rounded down to whole prompts (the samples of one prompt always
            decode together), at least one prompt; bounds the decoding memory. None: all at once (the
            ``Generator`` defaults to 8); backends that batch on their own (vLLM) take every prompt at once.
        merge_adapter: With ``backend: rlft`` in rollouts, decode with the LoRA folded into a temporary copy of the
            adapted weights (one matmul per layer instead of three; costs one copy of those weights).
        decode_dtype: With ``backend: rlft`` in rollouts, sample from a copy of the policy in this dtype (e.g.
            ``bfloat16`` for a fp32 policy on a CPU with bf16 matmuls: about half the memory traffic per token),
            refreshed from the policy before every rollout; samples are then very slightly off-policy (as with vLLM
            in bf16), the log-probs of the update still come from the policy. ``auto``: bf16 for a fp32 policy
            where the hardware runs bf16 natively (:func:`rlft.models.hardware.fast_bf16`), none elsewhere (and with
            other backends). Default: the policy itself.
        free_twin: With ``decode_dtype``, free the twin's weights after each rollout (the refresh before the next one
            rewrites them whole), so they are not held through the update. Default: on an accelerator, where freeing
            and reallocating is a cache hit; not on a CPU, where the pages fault back in (SmolLM2 GRPO here: peak RSS
            2.20 -> 2.02 GB but steps 3.98 -> 4.44 s).
        lean_step: With ``backend: rlft``, decode Llama, Mistral, Qwen2 and Qwen3 models token by token without the
            modeling code (:func:`rlft.generation.lean_step.lean_step`: the same arithmetic, q/k/v and gate/up each one
            matmul); other models always step through their forward.
        vllm_gpu_memory_utilization: With ``backend: vllm`` in rollouts, the share of the GPU vLLM takes (weights +
            KV cache).
        vllm_max_model_len: With ``backend: vllm`` in rollouts, longest prompt + response vLLM plans for (default:
            the model's context).
    """

    backend: str = "rlft"
    batch_size: int | None = None
    merge_adapter: bool = True
    decode_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    free_twin: bool | None = None
    lean_step: bool = True
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.backend != "auto":
            get_sampler(self.backend)  # a registered name or `module:function`; the error lists the registered ones
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null (all at once), got {self.batch_size}")
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.decode_dtype not in DECODE_DTYPES:
            raise ValueError(f"decode_dtype must be null, auto, bfloat16, float16 or float32: {self.decode_dtype!r}")
        if self.decode_dtype not in (None, "auto") and self.backend != "rlft":  # model.generate samples the policy
            raise ValueError(f"decode_dtype={self.decode_dtype!r} needs backend 'rlft', got {self.backend!r}")
        if self.free_twin is not None and self.decode_dtype is None:  # no twin to free or keep
            raise ValueError(
                f"free_twin={self.free_twin} needs a decode_dtype (a decoding twin); set it or drop free_twin"
            )


DECODER_KEYS = frozenset(DecoderSettings.__dataclass_fields__) | {"generation_batch_size"}


def sampling_settings(
    value: SamplingSettings | dict | None, default: SamplingSettings = SamplingSettings(), *, online: bool = False
) -> SamplingSettings:
    """``value`` as :class:`SamplingSettings`: a dict overrides the fields it names on ``default``; a decoder key
    in it fails with a message saying to move it under ``decoder:``. ``online``: refuse ``num_samples`` (online
    methods sample their ``group_size`` per prompt) and ``stop`` strings."""
    if isinstance(value, dict):
        misplaced = sorted(set(value) & DECODER_KEYS)
        if misplaced:
            raise ValueError(misplaced_message(misplaced))
        value = SamplingSettings(**{**default.__dict__, **value})
    settings = default if value is None else value
    if online and settings.num_samples != 1:
        raise ValueError(f"sampling.num_samples={settings.num_samples}: online methods sample `group_size` per prompt")
    if online and settings.stop:
        raise ValueError("sampling.stop (strings) is for evaluation and serving; rollouts stop on stop_token_ids")
    return settings


def misplaced_message(keys) -> str:
    """One line telling a config that puts decoder keys under ``sampling:`` where they belong."""
    names = [f"sampling.{key}" for key in keys]
    renamed = " (generation_batch_size is now decoder.batch_size)" if "generation_batch_size" in keys else ""
    if len(names) == 1:
        key = "batch_size" if keys[0] == "generation_batch_size" else keys[0]
        return f"{names[0]} is a decoder setting: move it from `sampling:` to `decoder:` (model.decoder.{key})"
    return f"{', '.join(names)} are decoder settings: move them from `sampling:` to `decoder:`{renamed}"
