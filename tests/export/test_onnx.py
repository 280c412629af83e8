"""ONNX export of tiny models of every family, run in onnxruntime: PyTorch's logits and greedy tokens, via the cache."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rlft.export import export_onnx
from rlft.models import load_model, load_tokenizer
from rlft.models.tokens import stop_token_ids
from tests.export.clients import run_in_onnxruntime
from tests.export.conftest import FAMILIES
from tests.isolation import run_isolated

if importlib.util.find_spec("onnxruntime") is None:  # found, not imported: onnxruntime loads only in the child
    pytest.skip("onnxruntime is not installed (pip install 'rlft[export]')", allow_module_level=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_decoder_matches_pytorch_with_and_without_cache(family, tiny_adapter, tmp_path):
    adapter, _ = tiny_adapter(family)
    folder = export_onnx(str(adapter), tmp_path / "onnx")
    files = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    network = load_model(str(adapter), trainable_adapter=False).eval()
    tokenizer = load_tokenizer(str(folder))  # the tokenizer travelled with the graph

    # a left-padded batch of two prompts in one forward: padding, mask and positions as generation uses them
    ids = np.array([[0, 0, 5, 17, 42, 99], [8, 31, 64, 100, 7, 3]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    # then one more token through the cache, and greedy generation of a chat prompt
    step_ids, step_mask = np.array([[11], [12]]), np.concatenate([mask, np.ones((2, 1), int)], 1)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer, network)
    logits, step_logits, onnx_greedy = run_isolated(
        run_in_onnxruntime, folder, ids, mask, positions, step_ids, step_mask, prompt, set(stops), timeout=600
    )

    with torch.no_grad():
        want = network(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    real = mask.astype(bool)
    assert np.abs(logits[real] - want.logits.numpy()[real]).max() < 1e-4

    # one more token through the cache equals the same step in PyTorch
    with torch.no_grad():
        step_want = network(
            input_ids=torch.tensor(step_ids),
            attention_mask=torch.tensor(step_mask),
            position_ids=torch.tensor(positions[:, -1:] + 1),
            past_key_values=want.past_key_values,
        ).logits.numpy()
    assert np.abs(step_logits - step_want).max() < 1e-4

    with torch.no_grad():
        greedy = network.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=stops)[
            0, len(prompt) :
        ].tolist()
    assert onnx_greedy == greedy


def test_onnx_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx("tiny-llama", tmp_path)
