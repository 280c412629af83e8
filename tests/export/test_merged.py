"""`rlft export --to merged`: LoRA merged into the base, a plain folder transformers loads without peft or rlft."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from rlft.cli import main as rlft_main
from rlft.export import export_gguf, export_merged
from tests.export.conftest import reference_logits

IDS = [[5, 17, 42, 99, 100, 7, 3, 250]]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_adapter_folder_merges_into_a_plain_transformers_folder(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    out = tmp_path / "merged"
    rlft_main(["export", str(adapter), "--to", "merged", "--out", str(out)])
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no peft, no rlft
    assert not any("lora" in name for name in plain.state_dict())
    with torch.no_grad():
        merged = plain(torch.tensor(IDS)).logits.numpy()
    unmerged = reference_logits(str(adapter), IDS)
    base = reference_logits(f"tiny-{family}", IDS)
    assert np.abs(merged - unmerged).max() < 1e-4
    assert np.abs(unmerged - base).max() > 1e-3  # the adapter changed the model, so merging it is visible
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template == original.chat_template and tokenizer.chat_template
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


def test_checkpoint_and_gguf_model_strings_export_too(tiny_adapter, tmp_path):
    adapter, checkpoint = tiny_adapter("llama")
    from_ckpt = export_merged(str(checkpoint), tmp_path / "from_ckpt")
    with torch.no_grad():
        ckpt_logits = transformers.AutoModelForCausalLM.from_pretrained(from_ckpt)(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ckpt_logits - reference_logits(str(adapter), IDS)).max() < 1e-4

    gguf_file = export_gguf(str(adapter), tmp_path / "x.gguf", quant="f32")
    from_gguf = export_merged(str(gguf_file), tmp_path / "from_gguf")  # a GGUF-loaded model saves as plain weights
    with torch.no_grad():
        gguf_logits = transformers.AutoModelForCausalLM.from_pretrained(from_gguf)(torch.tensor(IDS)).logits.numpy()
    assert np.abs(gguf_logits - ckpt_logits).max() < 1e-4
    config = json.loads((from_gguf / "config.json").read_text())
    assert "quantization_config" not in config


def test_bf16_export_and_refusal_to_overwrite(tmp_path):
    out = export_merged("tiny-qwen2", tmp_path / "bf16", dtype="bfloat16")
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged("tiny-qwen2", out)
    with pytest.raises(ValueError, match="dtype"):
        export_merged("tiny-qwen2", tmp_path / "bad", dtype="int3")
