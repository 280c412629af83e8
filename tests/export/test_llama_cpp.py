"""GGUF exports of tiny models of every family in llama.cpp (llama-cpp-python): same tokens, logits, greedy text."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rlft.export import export_gguf
from rlft.models import load_model, load_tokenizer
from rlft.models.tokens import stop_token_ids
from tests.export.clients import run_in_llama_cpp
from tests.export.conftest import FAMILIES
from tests.isolation import run_isolated

if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: llama.cpp loads only in the child
    pytest.skip("llama-cpp-python is not installed (pip install 'rlft[export]')", allow_module_level=True)

TEXT = "The capital of France is Paris. What is 12345 + 678?\n\tdef add(a, b): return a + b  <|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_exported_adapter_like_transformers(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    path = export_gguf(str(adapter), tmp_path / f"{family}.gguf", quant="f16")
    tokenizer = load_tokenizer(str(adapter))
    network = load_model(str(adapter), trainable_adapter=False).eval()
    hf_ids = tokenizer(TEXT)["input_ids"]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    stops = set(stop_token_ids(tokenizer, network))
    cpp = run_isolated(run_in_llama_cpp, path, TEXT, chat, hf_ids, chat_ids, stops, timeout=600)

    # llama.cpp's own tokenizer, from the GGUF metadata, splits text as the Hugging Face one does
    assert cpp["text_ids"] == hf_ids
    assert cpp["chat_ids"] == chat_ids
    assert cpp["chat_template"] == tokenizer.chat_template

    with torch.no_grad():
        hf_logits = network(torch.tensor([hf_ids])).logits[0].numpy()
    diff = np.abs(cpp["logits"] - hf_logits).max()
    print(f"{family}: llama.cpp f16 vs transformers max logit diff {diff:.2e}")
    assert diff < 1e-2  # f16 weights; logits are ~0.5 in size, so a layout bug is off by ~0.3

    with torch.no_grad():
        hf = network.generate(torch.tensor([chat_ids]), max_new_tokens=16, do_sample=False, eos_token_id=sorted(stops))[
            0, len(chat_ids) :
        ].tolist()
    assert cpp["greedy"] == hf
