"""The batched text generator evaluation and serving share.

Prompts are either plain strings (completion mode, e.g. HumanEval for base models) or message lists (rendered with
the tokenizer's chat template plus the generation header). The generator encodes them, left-pads batches of similar
length and hands each batch to a sampling backend of :mod:`rlft.generation.backends` (``hf``: ``model.generate``
with the KV cache; ``vllm``, used when vLLM is installed, a GPU is present and the model is on disk: it loads the
model again from its folder, an adapter folder served through vLLM's LoRA support on top of its base; ``rlft``:
rlft's decoder; :class:`~rlft.generation.settings.DecoderSettings` names it), then decodes and cuts the text at the
stop strings of the :class:`~rlft.generation.settings.SamplingSettings`. Every backend can report each generated token
to a callback, which is how ``rlft serve`` streams and counts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch

from rlft.generation.backends import batches_itself, get_sampler
from rlft.generation.request import SampleRequest
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.generation.vllm import VLLMEngine, vllm_sample, vllm_usable
from rlft.models.modes import inference
from rlft.models.tokens import pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

Prompt = str | list[dict]
# called as on_token(prompt index, sample index, token id) for every token a backend generates, in order (the torch
# backends step by step, a finished row receiving pad ids until its batch ends; vLLM each row's tokens after
# generation). Greedy decoding reports sample 0 only.
TokenCallback = Callable[[int, int, int], None]


#: the generator's decoder unless told otherwise: vLLM when usable and the model is on disk, else hf; 8 sequences
GENERATOR_DECODER = DecoderSettings(backend="auto", batch_size=8)


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


class Generator:
    """The batched generator all evaluations and the windowed server share.

    Args:
        model: A loaded causal LM (``PreTrainedModel`` or ``PeftModel``); None only for a vLLM backend.
        tokenizer: Its tokenizer (with a chat template for message prompts).
        decoder: How to decode (:class:`~rlft.generation.settings.DecoderSettings`): ``backend`` ``auto`` (vLLM
            when usable and ``model_path`` is given, else ``hf``) or a backend of :mod:`rlft.generation.backends`
            (``hf``, ``vllm``, ``rlft`` or ``module:function``), ``batch_size`` sequences per forward, ``lean_step``
            for ``rlft``. Default :data:`GENERATOR_DECODER`.
        model_path: Folder of the model on disk (the base, when ``adapter_path`` is given); only vLLM needs it.
        adapter_path: LoRA adapter folder vLLM applies on top of ``model_path``.
        dtype: vLLM's dtype.
    """

    def __init__(
        self,
        model,
        tokenizer,
        decoder: DecoderSettings = GENERATOR_DECODER,
        *,
        model_path: str | None = None,
        adapter_path: str | None = None,
        dtype: str = "auto",
    ) -> None:
        backend = decoder.backend
        if backend == "auto":
            backend = "vllm" if model_path is not None and vllm_usable() else "hf"
        self.decoder = decoder
        self.sample = get_sampler(backend)
        self.model, self.tokenizer = model, tokenizer
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
        self.options: dict = {"lean": decoder.lean_step}
        if self.sample is vllm_sample:  # evaluation's vLLM loads the weights itself, from the folder
            if not (vllm_usable() and model_path):
                raise ValueError("backend='vllm' needs vLLM installed, a CUDA GPU and the model as a folder on disk")
            self.options["engine"] = VLLMEngine.from_folder(model_path, adapter_path=adapter_path, dtype=dtype)
        elif model is None:
            raise ValueError(f"the {self.backend_name!r} backend needs a loaded model (vLLM is not usable here)")
        log.info("generation backend: %s", self.backend_name)

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings | None = None,
        on_token: TokenCallback | None = None,
        *,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """``settings.num_samples`` completions per prompt, in prompt order (default settings: greedy, 256 tokens);
        ``on_token`` sees every new token (what serving streams and counts); ``batch_size`` overrides the decoder's
        sequences per forward for this call."""
        if not prompts:
            return []
        settings = settings or SamplingSettings()
        tok = self.tokenizer
        encoded = [encode_prompt_text(tok, p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        outputs: list[list[str]] = [[] for _ in prompts]
        sampling = settings.temperature > 0
        per_prompt = settings.num_samples if sampling else 1  # greedy: one sample, repeated below
        rows = batch_size or self.decoder.batch_size
        # whole prompts per forward: a prompt's samples decode together
        size = len(order) if batches_itself(self.sample) or rows is None else max(1, rows // per_prompt)
        device = next(self.model.parameters()).device if self.model is not None else torch.device("cpu")
        options = dict(
            max_new_tokens=settings.max_new_tokens,
            stop_ids=stop_token_ids(tok, self.model, settings.stop_token_ids),
            pad_id=pad_token_id(tok),
            group_size=per_prompt,
            temperature=settings.temperature,
            top_p=settings.top_p if sampling else 1.0,
            top_k=settings.top_k if sampling else None,
            seed=settings.seed,
            stop_strings=tuple(settings.stop),
            tokenizer=tok,
            options=self.options,
        )
        # a private RNG stream: seeded sampling must not reset the generator a training run is using
        devices = [device.index or 0] if device.type == "cuda" else []
        modes = inference(self.model) if self.model is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), modes:
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), options["pad_id"], dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]) :] = 1
                report = None
                if on_token is not None:

                    def report(row: int, token: int, batch: list[int] = batch) -> None:
                        on_token(batch[row // per_prompt], row % per_prompt, token)

                request = SampleRequest(**options, on_token=report)
                tokens = self.sample(self.model, ids.to(device), mask.to(device), request)
                texts = tok.batch_decode(tokens, skip_special_tokens=True)
                for row, i in enumerate(batch):
                    samples = [cut_at_stop(t, settings.stop) for t in texts[row * per_prompt : (row + 1) * per_prompt]]
                    # greedy decoding is deterministic: n identical samples without n forward passes
                    outputs[i] = samples if sampling else samples * settings.num_samples
        return outputs
