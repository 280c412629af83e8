"""The vLLM sampling backend (``backend: vllm``): an engine in this process, for rollouts and for evaluation.

For rollouts the engine is **colocated** with training: built once per policy from the policy's base folder, it keeps
a share of the GPU (``gpu_memory_utilization``); before every rollout the policy's current weights are pushed into
it, LoRA merged (:func:`rlft.generation.decoder.merged_adapter`, the originals restored afterwards), under the
Hugging Face names vLLM's ``load_weights`` reads — the same hand-off as TRL's ``vllm_mode="colocate"`` and
OpenRLHF's hybrid engine, without a second process or a server. Log-probs for the update are still recomputed by the
policy, so vLLM's bf16 kernels only decide *which* tokens are sampled. For evaluation and serving the engine loads a
model folder itself (:meth:`VLLMEngine.from_folder`), an adapter folder served through vLLM's LoRA support.
This module imports vLLM only when it is used; on a machine without vLLM or a CUDA GPU, asking for it fails with a
message that names the fallback (``backend: rlft``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from rlft.generation.decoder import merged_adapter
from rlft.generation.request import SampleRequest
from rlft.models.unwrap import causal_lm

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
        raise ValueError(
            "decoder.backend vllm needs the policy's base weights as a folder or hub id (vLLM loads "
            "its own copy first); this model has no name_or_path"
        )
    return path


# max_lora_rank values vLLM accepts
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngine:
    """A vLLM engine in this process that samples token ids.

    Args:
        llm: The ``vllm.LLM``.
        lora_request: The adapter every call applies (vLLM's LoRA support), or None.
    """

    def __init__(self, llm, lora_request=None) -> None:
        self.llm, self.lora_request = llm, lora_request

    @classmethod
    def from_folder(cls, model_path: str, *, adapter_path: str | None = None, dtype: str = "auto") -> VLLMEngine:
        """An engine that loads ``model_path`` itself (evaluation, serving); ``adapter_path``, a peft LoRA folder, is
        served on top of it through vLLM's LoRA support (``enable_lora`` + a ``LoRARequest`` per call), unmerged."""
        from vllm import LLM

        kwargs: dict = {}
        lora_request = None
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"]
            kwargs = {"enable_lora": True, "max_lora_rank": next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)}
            lora_request = LoRARequest("rlft-adapter", 1, str(adapter_path))
        return cls(LLM(model=model_path, seed=0, dtype=dtype, **kwargs), lora_request)

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[int]]:
        """``group_size`` samples per prompt (rows of one prompt contiguous), each ending with its stop token when
        it stopped on one (vLLM reports a stop token id as the stop reason; it is put back where it was left out).
        ``top_k`` None or 0 samples from the whole vocabulary; ``seed`` None draws one from torch's RNG."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        params = SamplingParams(
            n=group_size,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k else -1,
            max_tokens=max_new_tokens,
            stop_token_ids=list(stop_ids),
            stop=list(stop_strings) or None,
            seed=seed,
        )
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        adapter = {"lora_request": self.lora_request} if self.lora_request is not None else {}
        outputs = self.llm.generate(requests, params, use_tqdm=False, **adapter)
        rows = []
        stops = set(stop_ids)
        for request in outputs:
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                stopped_on = sample.stop_reason if isinstance(sample.stop_reason, int) else None
                by_token = sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str)  # not a string
                if by_token and (not tokens or tokens[-1] not in stops):
                    tokens.append(stopped_on if stopped_on is not None else min(stops))
                rows.append(tokens[:max_new_tokens])
        return rows


class ColocatedVLLM(VLLMEngine):
    """A vLLM engine in this process that samples with the policy's current weights (rollouts).

    Args:
        model_path: Folder or hub id vLLM builds its engine from (the policy's base).
        gpu_memory_utilization: Share of the GPU vLLM may take (weights + KV cache); the rest stays for training.
        max_model_len: Longest prompt + response (default: the model's context, as vLLM reads it).
        dtype: vLLM's dtype (``"auto"``: the checkpoint's).
        seed: Seed of vLLM's sampler.
    """

    def __init__(
        self,
        model_path: str,
        *,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        if not vllm_usable():
            raise RuntimeError("decoder.backend vllm needs vLLM installed and a CUDA GPU; use decoder.backend rlft")
        # an in-process engine: its model object is reachable, so weights are pushed by reference, not serialised
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
        )
        super().__init__(llm)

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


def colocated_engine(model: torch.nn.Module, **options) -> ColocatedVLLM:
    """The policy's engine, built on first use."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = ColocatedVLLM(_base_path(model), **options)
    return engine


def vllm_sample(
    model: torch.nn.Module | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, request: SampleRequest
) -> torch.Tensor:
    """The ``vllm`` sampling backend: ``request.options["engine"]`` (a :class:`VLLMEngine`) samples, or else the
    policy's colocated engine with its current weights pushed first (``options``: ``gpu_memory_utilization``,
    ``max_model_len``). ``on_token`` sees each row's tokens after generation."""
    engine = request.options.get("engine")
    if engine is None:
        engine = colocated_engine(
            model,
            gpu_memory_utilization=request.options.get("gpu_memory_utilization", 0.3),
            max_model_len=request.options.get("max_model_len"),
        )
        engine.push(model)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    rows = engine.sample(
        prompts,
        group_size=request.group_size,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop_ids=request.stop_ids,
        stop_strings=request.stop_strings,
        seed=request.seed,
    )
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), request.pad_id, dtype=torch.long)
    for i, tokens in enumerate(rows):
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if request.on_token is not None:
            for token in tokens:
                request.on_token(i, token)
    return out.to(prompt_ids.device)


vllm_sample.batches_itself = True  # vLLM schedules its own batches: a generator hands it every prompt at once
