"""GGUF exports of tiny models of every family in llama.cpp (llama-cpp-python): same tokens, logits, greedy text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlft.export import export_gguf
from rlft.models import load_model, load_tokenizer
from rlft.models.tokens import stop_token_ids
from tests.export.conftest import FAMILIES

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'rlft[export]')")

TEXT = "The capital of France is Paris. What is 12345 + 678?\n\tdef add(a, b): return a + b  <|im_end|>"


def open_gguf(path, n_ctx: int = 256):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, n_threads=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_exported_adapter_like_transformers(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    path = export_gguf(str(adapter), tmp_path / f"{family}.gguf", quant="f16")
    tokenizer = load_tokenizer(str(adapter))
    network = load_model(str(adapter), trainable_adapter=False).eval()
    llm = open_gguf(path)
    try:
        # llama.cpp's own tokenizer, from the GGUF metadata, splits text as the Hugging Face one does
        hf_ids = tokenizer(TEXT)["input_ids"]
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == hf_ids
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
        )
        chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == chat_ids
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template

        llm.reset()
        llm.eval(hf_ids)
        cpp_logits = np.asarray(llm.scores[: len(hf_ids)])
        with torch.no_grad():
            hf_logits = network(torch.tensor([hf_ids])).logits[0].numpy()
        diff = np.abs(cpp_logits - hf_logits).max()
        print(f"{family}: llama.cpp f16 vs transformers max logit diff {diff:.2e}")
        assert diff < 1e-2  # f16 weights; logits are ~0.5 in size, so a layout bug is off by ~0.3

        stops = set(stop_token_ids(tokenizer, network))
        with torch.no_grad():
            hf = network.generate(
                torch.tensor([chat_ids]), max_new_tokens=16, do_sample=False, eos_token_id=sorted(stops)
            )[0, len(chat_ids) :].tolist()
        cpp = []
        for token in llm.generate(chat_ids, temp=0.0, top_k=1, reset=True):
            cpp.append(token)
            if token in stops or len(cpp) == 16:
                break
        assert cpp == hf
    finally:
        llm.close()
