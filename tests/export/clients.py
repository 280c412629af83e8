"""The native inference clients of the export tests, each run in an isolated child (tests/isolation.py) so that a
crash in llama.cpp or onnxruntime fails one test instead of the pytest process. Only numpy is imported here: the
child imports this module, so the clients (and, for onnxruntime, rlft.export) are imported inside the functions."""

from __future__ import annotations

import numpy as np


def run_in_llama_cpp(path, text: str, chat: str, hf_ids: list[int], chat_ids: list[int], stops: set[int]) -> dict:
    """The f16 GGUF at ``path`` in llama.cpp: its tokens of ``text`` and ``chat``, its chat template, its logits over
    ``hf_ids`` and its greedy tokens after ``chat_ids`` (up to 16, or a stop token)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2)
    try:
        seen = {
            "text_ids": llm.tokenize(text.encode(), add_bos=True, special=True),
            "chat_ids": llm.tokenize(chat.encode(), add_bos=False, special=True),
            "chat_template": llm.metadata["tokenizer.chat_template"],
        }
        llm.reset()
        llm.eval(hf_ids)
        seen["logits"] = np.array(llm.scores[: len(hf_ids)])  # a copy: generate() below rewrites the buffer
        cpp = []
        for token in llm.generate(chat_ids, temp=0.0, top_k=1, reset=True):
            cpp.append(token)
            if token in stops or len(cpp) == 16:
                break
        seen["greedy"] = cpp
        return seen
    finally:
        llm.close()


def run_in_onnxruntime(folder, ids, mask, positions, step_ids, step_mask, prompt: list[int], stops: set[int]):
    """The ONNX folder in onnxruntime (rlft's ``OnnxCausalLM``): the batch's logits, one more step's logits through
    the cache, and the greedy tokens of ``prompt`` (up to 24, or a stop token)."""
    from rlft.export import OnnxCausalLM

    runtime = OnnxCausalLM(folder)
    logits, cache = runtime.step(ids, mask, positions, runtime.empty_cache(2))
    step_logits, _ = runtime.step(step_ids, step_mask, positions[:, -1:] + 1, cache)
    return logits, step_logits, runtime.generate(prompt, 24, stops)
