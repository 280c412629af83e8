"""Sampling from a causal LM, one layer above :mod:`rlft.models` and below rollouts, evaluation and serving.

- :mod:`~rlft.generation.backends` — the registry of sampling backends (``rlft``, ``hf``, ``vllm``), one signature;
- :mod:`~rlft.generation.request` — :class:`~rlft.generation.request.SampleRequest`, what a backend is asked for;
- :mod:`~rlft.generation.decoder` — rlft's decoder: shared prefill per group, finished rows dropped, LoRA merged,
  the bf16 decoding twin;
- :mod:`~rlft.generation.lean_step` — one Llama-family decoding step without the modeling code;
- :mod:`~rlft.generation.kv_cache` — the preallocated KV cache and fp32 attention for bf16 models on a CPU;
- :mod:`~rlft.generation.vllm` — vLLM engines in this process (colocated with training, or loading a folder);
- :mod:`~rlft.generation.settings` — the two settings types of every sampler: :class:`SamplingSettings` (what is
  sampled) and :class:`DecoderSettings` (how it is decoded), for rollouts, evaluation and serving alike;
- :mod:`~rlft.generation.generator` — the batched text :class:`~rlft.generation.generator.Generator` evaluation
  and serving share.
"""

from rlft.generation.generator import Generator
from rlft.generation.settings import DecoderSettings, SamplingSettings

__all__ = ["DecoderSettings", "Generator", "SamplingSettings"]
