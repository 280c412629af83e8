"""Rollouts through vLLM colocated with training (``sampling.backend: vllm``): one engine in the trainer's process.

The engine is built once per policy from the policy's base folder and keeps a share of the GPU
(``gpu_memory_utilization``); before every rollout the policy's current weights are pushed into it, LoRA merged
(:func:`rlft.rl.decoding.merged_adapter`, the originals restored afterwards), under the Hugging Face names vLLM's
``load_weights`` reads — the same hand-off as TRL's ``vllm_mode="colocate"`` and OpenRLHF's hybrid engine, without
a second process or a server. Log-probs for the update are still recomputed by the policy, so vLLM's bf16 kernels
only decide *which* tokens are sampled. This module imports vLLM only when it is used; on a machine without vLLM or
a CUDA GPU, asking for it fails with a message that names the fallback (``backend: rlft``).
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Iterator, Sequence

import torch

from rlft.models.scoring import causal_lm
from rlft.rl.decoding import merged_adapter

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA GPU is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, tensor)`` of every weight of the policy as a plain model: call inside
    :func:`merged_adapter`, so adapted layers already hold ``W + s·BA``; the LoRA factors themselves are skipped."""
    for name, param in causal_lm(model).named_parameters():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        yield name.replace(".base_layer.", "."), param.detach()


def _base_path(model: torch.nn.Module) -> str:
    lm = causal_lm(model)
    path = getattr(lm.config, "_name_or_path", None) or getattr(lm, "name_or_path", None)
    if not path:
        raise ValueError("sampling.backend vllm needs the policy's base weights as a folder or hub id (vLLM loads "
                         "its own copy first); this model has no name_or_path")  # fmt: skip
    return path


class ColocatedVLLM:
    """A vLLM engine in this process that samples with the policy's current weights.

    Args:
        model_path: Folder or hub id vLLM builds its engine from (the policy's base).
        gpu_memory_utilization: Share of the GPU vLLM may take (weights + KV cache); the rest stays for training.
        max_model_len: Longest prompt + response (default: the model's context, as vLLM reads it).
        dtype: vLLM's dtype (``"auto"``: the checkpoint's).
        seed: Seed of vLLM's sampler.
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 dtype: str = "auto", seed: int = 0) -> None:  # fmt: skip
        if not vllm_usable():
            raise RuntimeError("sampling.backend vllm needs vLLM installed and a CUDA GPU; use sampling.backend rlft")
        # an in-process engine: its model object is reachable, so weights are pushed by reference, not serialised
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       dtype=dtype, seed=seed, enable_prefix_caching=True)  # fmt: skip

    def _network(self):
        executor = self.llm.llm_engine.model_executor
        return executor.driver_worker.model_runner.model  # in-process: V1 multiprocessing is off

    def push(self, model: torch.nn.Module) -> int:
        """Load the policy's current (merged) weights into the engine; returns how many tensors were sent."""
        network = self._network()
        with torch.no_grad(), merged_adapter(model):
            weights = list(vllm_weights(model))
            network.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prefixes were computed with the old weights
            self.llm.reset_prefix_cache()
        return len(weights)

    def sample(self, prompts: Sequence[Sequence[int]], *, group_size: int, max_new_tokens: int, temperature: float,
               top_p: float, top_k: int, stop_ids: Sequence[int]) -> list[list[int]]:  # fmt: skip
        """``group_size`` samples per prompt (rows of one prompt contiguous), each ending with its stop token when
        it stopped (vLLM reports a stop token id as the stop reason; it is put back where it was left out)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                                seed=int(torch.randint(0, 2**31 - 1, ()).item()))  # fmt: skip
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        rows = []
        stops = set(stop_ids)
        for request in outputs:
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                stopped_on = sample.stop_reason if isinstance(sample.stop_reason, int) else None
                if sample.finish_reason == "stop" and (not tokens or tokens[-1] not in stops):
                    tokens.append(stopped_on if stopped_on is not None else min(stops))
                rows.append(tokens[:max_new_tokens])
        return rows


def colocated_engine(model: torch.nn.Module, **options) -> ColocatedVLLM:
    """The policy's engine, built on first use."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = ColocatedVLLM(_base_path(model), **options)
    return engine


def vllm_generate(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, group_size: int,
                  max_new_tokens: int, temperature: float, top_p: float, top_k: int, stop_ids: Sequence[int],
                  pad_id: int, gpu_memory_utilization: float = 0.3,
                  max_model_len: int | None = None) -> torch.Tensor:  # fmt: skip
    """Like :func:`rlft.rl.decoding.decode`: ``[B * group_size, T]`` sampled tokens, padded with ``pad_id``."""
    engine = colocated_engine(model, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    engine.push(model)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    rows = engine.sample(prompts, group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop_ids=stop_ids)  # fmt: skip
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, tokens in enumerate(rows):
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out.to(prompt_ids.device)
