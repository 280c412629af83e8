"""ONNX export: one decoder graph with KV-cache inputs and outputs, so onnxruntime can generate token by token.

The graph (``model.onnx``) takes ``input_ids [batch, seq]``, ``attention_mask [batch, past + seq]``,
``position_ids [batch, seq]`` and ``past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]`` for every
layer, and returns ``logits [batch, seq, vocab]`` and ``present.{i}.key|value`` (the cache grown by ``seq``) - the
names optimum and transformers.js use. The first step feeds a cache of length 0. The folder also holds the
tokenizer files, ``config.json`` and ``generation_config.json``. Exported with ``torch.onnx`` (optimum's exporter
lags the transformers release rlft uses); :class:`OnnxCausalLM` runs it in onnxruntime.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rlft.export.card import write_export_card
from rlft.export.merged import merged_model

log = logging.getLogger(__name__)

OPSET = 18


class _DecoderWithCache(torch.nn.Module):
    """Flat tensors in and out around a Hugging Face decoder and its ``DynamicCache``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.get_text_config().num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def cache_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def export_onnx(model: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``model`` (any rlft model string; LoRA merged first) as an ONNX decoder folder at ``out``.

    Args:
        model: Alias, hub id, folder, adapter folder, ``.ckpt`` or ``.gguf``.
        out: Target folder (``model.onnx`` + tokenizer + configs).
        dtype: Weights dtype; ``float32`` is the one checked against PyTorch to 1e-4.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder")
    network, tokenizer = merged_model(model, dtype=dtype)
    network.config._attn_implementation = "eager"  # the plain attention graph exports everywhere
    layers, kv_heads, head_dim = cache_shape(network.config)
    batch, seq, past = 2, 3, 4  # distinct, > 1: no dimension gets specialised to a constant while tracing
    parameter = next(network.parameters())
    example = (
        torch.randint(0, network.config.get_text_config().vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        *(torch.randn(batch, kv_heads, past, head_dim, dtype=parameter.dtype) for _ in range(2 * layers)),
    )
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    total = torch.export.Dim("total")  # past + sequence, checked by the attention itself
    # *past is one group of inputs to torch.export
    dynamic = [{0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past_names)]
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            _DecoderWithCache(network).eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=dynamic,
            optimize=True,
        )
    program.save(str(out / "model.onnx"), external_data=_needs_external_data(network))
    network.config.save_pretrained(out)
    network.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_export_card(out, model, usage="onnx")
    log.info("ONNX decoder written to %s", out)
    return out


def _needs_external_data(network: torch.nn.Module) -> bool:
    """Weights past protobuf's 2 GB limit must live beside the graph."""
    return sum(p.numel() * p.element_size() for p in network.parameters()) > 1.8e9


class OnnxCausalLM:
    """An exported folder in onnxruntime: one step with the cache, and greedy generation over it.

    Args:
        folder: Folder written by :func:`export_onnx`.
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime
        import transformers

        self.folder = Path(folder)
        self.session = onnxruntime.InferenceSession(
            str(self.folder / "model.onnx"), providers=providers or ["CPUExecutionProvider"]
        )
        self.config = transformers.AutoConfig.from_pretrained(self.folder)
        self.layers, self.kv_heads, self.head_dim = cache_shape(self.config)
        cache_input = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.cache_dtype = np.float16 if "float16" in cache_input.type else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype) for _ in range(2 * self.layers)]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(logits, new cache)`` for ``input_ids`` after the ``cache`` (one forward of the graph)."""
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = cache[2 * i], cache[2 * i + 1]
        logits, *present = self.session.run(None, feed)
        return logits, present

    def generate(self, input_ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
        """Greedy continuation of one prompt, feeding only the new token each step."""
        ids = np.asarray([input_ids], dtype=np.int64)
        cache, produced, length = self.empty_cache(1), [], ids.shape[1]
        positions = np.arange(length)[None]
        for _ in range(max_new_tokens):
            logits, cache = self.step(ids, np.ones((1, length), np.int64), positions, cache)
            token = int(logits[0, -1].argmax())
            produced.append(token)
            if token in stop_ids:
                break
            ids, positions, length = np.asarray([[token]]), np.asarray([[length]]), length + 1
        return produced
