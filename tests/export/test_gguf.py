"""GGUF export on tiny models of every family, read back with the gguf package's GGUFReader and rlft's import."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from rlft.export import export_gguf
from rlft.export.gguf import FAMILIES as GGUF_FAMILIES
from rlft.export.gguf_vocab import bpe_pre_tokenizer
from rlft.models import load_model, load_tokenizer
from tests.export.conftest import FAMILIES, reference_logits

IDS = [[5, 17, 42, 99, 100, 7, 3, 250, 12, 64]]
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
# transformers' Qwen2 tokenizer class re-creates Qwen2's split regex; the other tiny tokenizers are GPT-2 byte level
PRE = {"llama": "gpt-2", "mistral": "gpt-2", "qwen2": "qwen2", "qwen3": "gpt-2", "gemma": "gpt-2"}


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _expected_weight(network, hf_name: str, family: str) -> np.ndarray:
    """What llama.cpp's layout of ``hf_name`` must be (undoing nothing: recomputed from the HF weights)."""
    config = network.config
    data = network.state_dict()[hf_name].float()
    spec = GGUF_FAMILIES[family]
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
        data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
    if spec.norm_offset and hf_name.endswith("norm.weight"):
        data = data + spec.norm_offset
    return data.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_weights_tokenizer_and_template(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    path = export_gguf(str(adapter), tmp_path / f"{family}.gguf", quant="f16")
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    tokenizer = load_tokenizer(str(adapter))
    assert fields["general.architecture"] == ARCH[family]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == PRE[family]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] == (tokenizer.bos_token is not None)  # tiny Llama/Gemma add BOS
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert len(fields["tokenizer.ggml.merges"]) > 0

    merged = load_model(str(adapter), trainable_adapter=False).merge_and_unload()
    names = gguf.get_tensor_name_map(GGUF_FAMILIES[family].arch, merged.config.num_hidden_layers)
    written = {t.name: t for t in reader.tensors}
    hf_names = [n for n in merged.state_dict() if not (n == "lm_head.weight" and merged.config.tie_word_embeddings)]
    expected = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in hf_names}
    assert set(written) == set(expected)
    for gguf_name, tensor in written.items():
        want = _expected_weight(merged, expected[gguf_name], family)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        kind = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == kind
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3, err_msg=gguf_name)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_round_trip_through_rlft_gguf_import_keeps_the_logits(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    want = reference_logits(str(adapter), IDS)
    # logits are ~0.3 in size: a layout bug is off by that much, rounding by far less
    for quant, tolerance in (("f32", 1e-4), ("f16", 5e-3), ("q8_0", 6e-2)):
        path = export_gguf(str(adapter), tmp_path / f"{quant}.gguf", quant=quant)
        got = reference_logits(str(path), IDS)  # rlft's GGUF import: load_model("x.gguf")
        assert np.abs(got - want).max() < tolerance, quant


def test_quant_types_shrink_the_file_and_stay_close(tmp_path):
    sizes, errors = {}, {}
    network = load_model("tiny-llama").eval()
    weight = network.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    for quant in ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        path = export_gguf("tiny-llama", tmp_path / f"{quant}.gguf", quant=quant)
        sizes[quant] = path.stat().st_size
        reader = gguf.GGUFReader(path)
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        assert tensor.tensor_type.name.lower() == quant
        errors[quant] = np.abs(gguf.quants.dequantize(tensor.data, tensor.tensor_type) - weight).max()
        embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
        if quant.startswith(("q4", "q5")):  # the embedding/output matrix keeps 8 bits
            assert embedding.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q5_0"] > sizes["q4_0"]
    assert errors["f32"] == 0 and errors["f16"] < errors["q8_0"] < errors["q5_0"] < errors["q4_0"] < 0.1


def test_unsupported_inputs_say_what_is_supported(tmp_path):
    with pytest.raises(ValueError, match="supports model types llama, mistral, qwen2, qwen3, gemma"):
        export_gguf("tiny-gpt2", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="--quant must be one of"):
        export_gguf("tiny-llama", tmp_path / "x.gguf", quant="q3_k")
    with pytest.raises(ValueError, match=".gguf file path"):
        export_gguf("tiny-llama", tmp_path / "x.bin")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_pre_tokenizer_is_read_from_tokenizer_json():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert bpe_pre_tokenizer({"pre_tokenizer": digits}) == "smollm"
    with pytest.raises(ValueError, match="not one llama.cpp reproduces"):
        bpe_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    from rlft.export.gguf import _llama3_rope_factors
    from rlft.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("llama")
    network = build_tiny_model("llama", tokenizer)
    network.config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    factors = _llama3_rope_factors(network.config)
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies untouched
    # the same rule transformers applies: inv_freq / factors must equal its scaled inverse frequencies
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](network.config, torch.device("cpu"))
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    np.testing.assert_allclose(plain.numpy() / factors, scaled.numpy(), rtol=1e-5)
