"""GGUF export for llama.cpp (and rlft's own GGUF import) of Llama, Mistral, Qwen2, Qwen3 and Gemma models.

Everything format-specific goes through the ``gguf`` package: ``GGUFWriter`` writes the file,
``gguf.get_tensor_name_map`` turns Hugging Face tensor names into llama.cpp's, ``gguf.quants.quantize`` packs the
blocks. What this module adds is the per-family knowledge llama.cpp's converter has: Llama/Mistral query and key
rows are permuted to llama.cpp's rotary layout, Gemma's RMSNorm weights are stored as ``1 + w``, tied output
embeddings are not written twice, and Llama 3 rope scaling becomes a ``rope_freqs`` tensor.

Types: ``f32``, ``f16``, ``bf16``, ``q8_0``, and ``q4_0``/``q4_1``/``q5_0``/``q5_1`` (the quantizers the ``gguf``
package implements; K-quants need llama.cpp's ``llama-quantize``). 1-D tensors (norms, biases) stay f32; a matrix
whose rows do not split into 32-value blocks falls back to f16; in the 4/5-bit types the token embedding and output
matrices are q8_0, since they cost the most accuracy per bit.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from rlft.export.gguf_vocab import add_vocab
from rlft.export.merged import export_merged, refuse_reward_model

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --quant name -> (type of 2-D tensors, file type, type of the embedding/output matrices)
QUANT_TYPES: dict[str, tuple[Q, F, Q]] = {
    "f32": (Q.F32, F.ALL_F32, Q.F32),
    "f16": (Q.F16, F.MOSTLY_F16, Q.F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16, Q.BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0, Q.Q8_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1, Q.Q8_0),
    "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0, Q.Q8_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1, Q.Q8_0),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0, Q.Q8_0),
}


@dataclass(frozen=True)
class Family:
    """How llama.cpp stores one Hugging Face ``model_type``.

    Args:
        arch: llama.cpp architecture.
        permute_qk: Rotary embedding in llama.cpp's interleaved ("normal") layout: q/k rows are permuted.
        norm_offset: Added to RMSNorm weights (Gemma computes ``x * (1 + w)``, llama.cpp ``x * w``).
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_offset: float = 0.0


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral as Llama
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3),
    "gemma": Family(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0),
}


def export_gguf(model: str, out: str | Path, *, quant: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (any rlft model string; LoRA merged first) as one GGUF file at ``out``.

    Args:
        model: Alias, hub id, folder, adapter folder, ``.ckpt`` or ``.gguf``.
        out: Target ``.gguf`` path.
        quant: One of :data:`QUANT_TYPES`.
        name: ``general.name`` in the file (default: the file name).
    """
    out = Path(out)
    if quant not in QUANT_TYPES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if out.suffix != ".gguf":
        raise ValueError(f"--out for GGUF must be a .gguf file path, got {out}")
    refuse_reward_model(model)
    with tempfile.TemporaryDirectory(prefix="rlft-gguf-") as folder:
        merged = export_merged(model, Path(folder) / "merged")
        write_gguf(merged, out, quant=quant, name=name or out.stem)
    return out


def write_gguf(folder: Path, out: Path, *, quant: str = "f16", name: str | None = None) -> Path:
    """Convert a plain (merged) Hugging Face folder to GGUF."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"GGUF export supports model types {', '.join(FAMILIES)}; {folder} is {config.model_type!r}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    network = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tensors = dict(_tensors(network, config, family))
    matrix_type, file_type, embedding_type = QUANT_TYPES[quant]

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(name or out.stem)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config, family)
    add_vocab(writer, folder, tokenizer, config.vocab_size)
    for gguf_name, array in tensors.items():
        wanted = embedding_type if gguf_name in ("token_embd.weight", "output.weight") else matrix_type
        data, qtype = _quantize(array, wanted)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)  # a half-written file never carries the final name
    log.info("GGUF (%s, %d tensors) written to %s", quant, len(tensors), out)
    return out


def _quantize(array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    if array.ndim == 1 or qtype == Q.F32:
        return array.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return array.astype(np.float16), Q.F16
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        return array.astype(np.float16), Q.F16
    return gguf.quants.quantize(array, qtype), qtype


def _tensors(network: torch.nn.Module, config, family: Family):
    """``(gguf name, float32 array)`` for every weight, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = getattr(config, "tie_word_embeddings", False)
    unmapped = []
    for hf_name, tensor in network.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(hf_name)
            continue
        data = tensor.detach().to(torch.float32)
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if family.norm_offset and hf_name.endswith("norm.weight"):
            data = data + family.norm_offset
        yield gguf_name, data.numpy()
    if unmapped:
        raise ValueError(f"{len(unmapped)} tensors have no llama.cpp name for {config.model_type}: {unmapped[:5]}")
    if (freqs := _llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs (as llama.cpp's converter does)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_settings(config) -> tuple[float, dict]:
    """``(rope theta, scaling dict or {})`` from a transformers 4 (``rope_theta``/``rope_scaling``) or 5
    (``rope_parameters``) config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = (
        params if params.get("rope_type", "default") != "default" else dict(getattr(config, "rope_scaling", None) or {})
    )  # noqa: E501
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return float(theta), scaling


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama3_rope_factors(config) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3 rope scaling (llama.cpp reads them from the ``rope_freqs`` tensor)."""
    theta, scaling = _rope_settings(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_hparams(writer: gguf.GGUFWriter, config, family: Family) -> None:
    theta, scaling = _rope_settings(config)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported by rlft's GGUF export (linear and llama3 are)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    if family.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(_head_dim(config))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
