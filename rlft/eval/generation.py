"""One batched generator for every evaluation that samples text.

Prompts are either plain strings (completion mode, e.g. HumanEval for base models) or message lists (rendered with
the tokenizer's chat template plus the generation header). The Hugging Face backend left-pads batches of similar
length and uses the KV cache; the vLLM backend is used when vLLM is installed, a GPU is present and the model is on
disk (it loads the model again from its folder; an adapter folder is served through vLLM's LoRA support on top of
its base). Both can report every generated token to a callback, which is how ``rlft serve`` streams and counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlft.models.modes import inference as eval_mode  # noqa: F401 - no grad, eval mode, restored after
from rlft.models.tokens import stop_token_ids
from rlft.rl.vllm_rollout import vllm_usable  # one check for serving, evaluation and rollouts

log = logging.getLogger(__name__)

Prompt = str | list[dict]
# called as on_token(prompt index, sample index, token id) for every token a backend generates, in order; a
# finished row keeps receiving pad/stop ids until its batch ends. Greedy decoding reports sample 0 only.
TokenCallback = Callable[[int, int, int], None]


@dataclass
class SamplingSettings:
    """How to sample.

    Args:
        max_new_tokens: Tokens generated at most per sample.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass (sampling only).
        num_samples: Samples per prompt (``n`` of pass@k).
        stop: Strings that end a sample; the text is cut before the first one.
        batch_size: Prompts per forward batch (HF backend).
        seed: Seed for sampling, so evaluations are reproducible.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)
    batch_size: int = 8
    seed: int = 0


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest stop string (unchanged if none occurs)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def encode_prompt_text(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat template + generation header for messages, plain encoding for strings."""
    if isinstance(prompt, str):
        # a string already rendered through the chat template carries its BOS: do not add a second one
        rendered = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
        return tokenizer(prompt, add_special_tokens=not rendered)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # the template already holds BOS where the model wants one: adding it again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _TokenStreamer:
    """A ``generate`` streamer for whole batches: forwards each step's new tokens to a :data:`TokenCallback`."""

    def __init__(self, prompt_indices: list[int], per_prompt: int, on_token: TokenCallback) -> None:
        self.prompt_indices, self.per_prompt, self.on_token = prompt_indices, per_prompt, on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.on_token(self.prompt_indices[row // self.per_prompt], row % self.per_prompt, token)

    def end(self) -> None:
        pass


class HFBackend:
    """Batched ``model.generate`` with left padding, sorted by prompt length to minimise padding."""

    name = "hf"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings,
                 on_token: TokenCallback | None = None) -> list[list[str]]:  # fmt: skip
        tok = self.tokenizer
        encoded = [encode_prompt_text(tok, p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        outputs: list[list[str]] = [[] for _ in prompts]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        sampling = settings.temperature > 0
        stop_ids = stop_token_ids(tok, self.model)
        # a private RNG stream: seeded sampling must not reset the generator a training run is using
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(self.model):
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]) :] = 1
                kwargs = dict(temperature=settings.temperature, top_p=settings.top_p) if sampling else {}
                per_prompt = settings.num_samples if sampling else 1
                if on_token is not None:
                    kwargs["streamer"] = _TokenStreamer(batch, per_prompt, on_token)
                generated = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=sampling,
                    num_return_sequences=settings.num_samples if sampling else 1,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids,
                    **({"stop_strings": list(settings.stop), "tokenizer": tok} if settings.stop else {}),
                    **kwargs,
                )
                texts = tok.batch_decode(generated[:, width:], skip_special_tokens=True)
                for row, i in enumerate(batch):
                    samples = [cut_at_stop(t, settings.stop) for t in texts[row * per_prompt : (row + 1) * per_prompt]]
                    # greedy decoding is deterministic: n identical samples without n forward passes
                    outputs[i] = samples if sampling else samples * settings.num_samples
        return outputs


# max_lora_rank values vLLM accepts
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMBackend:
    """vLLM offline inference (optional; needs ``pip install vllm`` and a GPU).

    Args:
        model_path: Folder (or hub id) of the base weights.
        tokenizer: The tokenizer prompts are encoded with.
        adapter_path: A peft LoRA adapter folder served on top of the base through vLLM's LoRA support
            (``enable_lora`` + a ``LoRARequest`` per call), so adapters need no merge first.
        dtype: vLLM's dtype (``"auto"``: the checkpoint's).
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, adapter_path: str | None = None, dtype: str = "auto") -> None:
        from vllm import LLM

        kwargs: dict = {}
        self.lora_request = None
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"]
            kwargs = {"enable_lora": True, "max_lora_rank": next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)}
            self.lora_request = LoRARequest("rlft-adapter", 1, str(adapter_path))
        self.llm, self.tokenizer = LLM(model=model_path, seed=0, dtype=dtype, **kwargs), tokenizer

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings,
                 on_token: TokenCallback | None = None) -> list[list[str]]:  # fmt: skip
        """vLLM reports whole samples: ``on_token`` is called with their token ids after generation."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            top_p=settings.top_p if settings.temperature > 0 else 1.0,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            seed=settings.seed,
            stop_token_ids=stop_token_ids(self.tokenizer),  # end where the HF backend and training end
        )
        inputs = [TokensPrompt(prompt_token_ids=encode_prompt_text(self.tokenizer, p)) for p in prompts]
        results = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        if on_token is not None:
            for i, result in enumerate(results):
                for j, sample in enumerate(result.outputs[: 1 if settings.temperature == 0 else None]):
                    for token in sample.token_ids:
                        on_token(i, j, token)
        return [[cut_at_stop(o.text, settings.stop) for o in r.outputs] for r in results]


class Generator:
    """The batched generator all evaluations share.

    Args:
        model: A loaded causal LM (``PreTrainedModel`` or ``PeftModel``).
        tokenizer: Its tokenizer (with a chat template for message prompts).
        backend: ``"auto"`` (vLLM when usable and ``model_path`` is given, else HF), ``"hf"`` or ``"vllm"``.
        model_path: Folder of the model on disk (the base, when ``adapter_path`` is given); only vLLM needs it.
        adapter_path: LoRA adapter folder vLLM applies on top of ``model_path``.
        dtype: vLLM's dtype.
    """

    def __init__(self, model, tokenizer, *, backend: str = "auto", model_path: str | None = None,
                 adapter_path: str | None = None, dtype: str = "auto") -> None:  # fmt: skip
        if backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"backend must be 'auto', 'hf' or 'vllm', got {backend!r}")
        if backend == "vllm" and not (vllm_usable() and model_path):
            raise ValueError("backend='vllm' needs vLLM installed, a CUDA GPU and the model as a folder on disk")
        use_vllm = backend == "vllm" or (backend == "auto" and model_path is not None and vllm_usable())
        self.model, self.tokenizer = model, tokenizer
        if use_vllm:
            self.backend = VLLMBackend(model_path, tokenizer, adapter_path=adapter_path, dtype=dtype)
        elif model is None:
            raise ValueError("the Hugging Face backend needs a loaded model (vLLM is not usable here)")
        else:
            self.backend = HFBackend(model, tokenizer)
        log.info("generation backend: %s", self.backend.name)

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings | None = None,
                 on_token: TokenCallback | None = None) -> list[list[str]]:  # fmt: skip
        """``settings.num_samples`` completions per prompt, in prompt order; ``on_token`` sees every new token
        (what serving streams and counts)."""
        if not prompts:
            return []
        return self.backend.generate(list(prompts), settings or SamplingSettings(), on_token=on_token)
