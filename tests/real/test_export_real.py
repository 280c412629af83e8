"""Real model: SmolLM2-135M-Instruct LoRA-SFT'd a few steps, exported to every format and run by clients rlft did
not write - llama.cpp (llama-cpp-python), onnxruntime, and plain transformers."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
import transformers

from rlft.eval.data import load_records
from rlft.export import export_gguf, export_merged, export_onnx
from rlft.models import load_model, load_tokenizer
from rlft.models.tokens import stop_token_ids
from tests.export.conftest import train_adapter
from tests.isolation import run_isolated

pytestmark = [pytest.mark.real, pytest.mark.timeout(2400)]
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "What is 17 + 25? Explain."]
Q8_PERPLEXITY_DELTA = 0.02  # q8_0 perplexity within 2% of the fp32 model's


@pytest.fixture(scope="module")
def smollm2_sft(smollm2, shared_data, tmp_path_factory):
    """``(adapter folder, tokenizer, fp32 PyTorch model with the adapter)`` after 4 LoRA SFT steps."""
    data = str(shared_data / "alpaca_seed_tasks.jsonl")
    adapter, _ = train_adapter(
        smollm2,
        tmp_path_factory.mktemp("smollm2-sft"),
        steps=4,
        lr=2e-3,
        batch_size=2,
        max_length=128,
        data=data,
        limit=16,
    )
    network = load_model(str(adapter), trainable_adapter=False).eval()
    return adapter, load_tokenizer(str(adapter)), network


def _prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _perplexity(logits_of, sequences: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in sequences:
        logits = torch.as_tensor(logits_of(ids), dtype=torch.float64)[:-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return float(np.exp(nll / count))


def _require(module: str, reason: str) -> None:
    """Skip unless ``module`` is installed; found, not imported: the native client loads only in the child."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(reason)


def run_in_llama_cpp(files: dict, prompts: list[list[int]], texts: list[str], stops, sequences, speed_prompt) -> dict:
    """In an isolated child (tests/isolation.py): the f16 GGUF's chat template, its tokens of each ``texts`` and
    greedy tokens (up to 32) after each ``prompts``; f16 and q8_0 perplexity over ``sequences``; q8_0 tokens/s."""
    import llama_cpp

    f16 = llama_cpp.Llama(model_path=files["f16"], n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    q8 = llama_cpp.Llama(model_path=files["q8_0"], n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    try:
        seen = {"chat_template": f16.metadata["tokenizer.chat_template"], "tokenized": [], "greedy": []}
        for ids, text in zip(prompts, texts, strict=True):
            seen["tokenized"].append(f16.tokenize(text.encode(), add_bos=False, special=True))
            got = []
            for token in f16.generate(ids, temp=0.0, top_k=1, reset=True):
                got.append(token)
                if token in stops or len(got) == 32:
                    break
            seen["greedy"].append(got)

        def llama_logits(llm):
            def run(ids):
                llm.reset()
                llm.eval(ids)
                return np.asarray(llm.scores[: len(ids)])

            return run

        seen["ppl_f16"], seen["ppl_q8"] = (
            _perplexity(llama_logits(f16), sequences),
            _perplexity(llama_logits(q8), sequences),
        )
        start, n_tokens = time.perf_counter(), 0
        for _ in q8.generate(speed_prompt, temp=0.0, top_k=1, reset=True):
            n_tokens += 1
            if n_tokens == 64:
                break
        seen["speed"] = n_tokens / (time.perf_counter() - start)
        return seen
    finally:
        f16.close()
        q8.close()


def test_gguf_in_llama_cpp_generates_like_transformers_and_q8_0_keeps_perplexity(smollm2_sft, shared_data, tmp_path):
    _require("llama_cpp", "llama-cpp-python is not installed (rlft[export])")
    adapter, tokenizer, network = smollm2_sft
    files = {q: export_gguf(str(adapter), tmp_path / f"smollm2-sft.{q}.gguf", quant=q) for q in ("f16", "q8_0")}
    sizes = {q: f.stat().st_size / 2**20 for q, f in files.items()}
    stops = stop_token_ids(tokenizer, network)
    prompts = [_prompt_ids(tokenizer, question) for question in PROMPTS]
    records = load_records(str(shared_data / "alpaca_seed_tasks.jsonl"), kind="sft", limit=24)
    sequences = [
        tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"][
            :512
        ]
        for r in records
    ]
    cpp = run_isolated(
        run_in_llama_cpp,
        {q: str(f) for q, f in files.items()},
        prompts,
        [tokenizer.decode(ids) for ids in prompts],
        set(stops),
        sequences,
        _prompt_ids(tokenizer, PROMPTS[1]),
        timeout=1800,
    )

    assert cpp["chat_template"] == tokenizer.chat_template
    equal = 0
    for question, ids, tokenized, got in zip(PROMPTS, prompts, cpp["tokenized"], cpp["greedy"], strict=True):
        assert tokenized == ids
        with torch.no_grad():
            want = network.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=stops)[
                0, len(ids) :
            ].tolist()
        equal += got == want
        print(f"{question!r}: transformers {tokenizer.decode(want)!r} | llama.cpp {tokenizer.decode(got)!r}")
    assert equal == len(PROMPTS)

    with torch.no_grad():
        ppl_torch = _perplexity(lambda ids: network(torch.tensor([ids])).logits[0], sequences)
    ppl_f16, ppl_q8, speed = cpp["ppl_f16"], cpp["ppl_q8"], cpp["speed"]
    delta = ppl_q8 / ppl_torch - 1
    print(
        f"perplexity on {len(sequences)} Alpaca seed tasks: torch fp32 {ppl_torch:.4f}, llama.cpp f16 "
        f"{ppl_f16:.4f}, q8_0 {ppl_q8:.4f} (delta {delta:+.2%}); sizes MiB {sizes}; q8_0 {speed:.1f} tok/s"
    )
    assert abs(ppl_f16 / ppl_torch - 1) < 0.005
    assert abs(delta) < Q8_PERPLEXITY_DELTA

    # round trip: rlft's own GGUF import reads the export back with the same logits
    ids = [_prompt_ids(tokenizer, PROMPTS[0])]
    with torch.no_grad():
        back = load_model(str(files["f16"])).eval()(torch.tensor(ids)).logits
        want = network(torch.tensor(ids)).logits
    diff = (back - want).abs().max().item()
    print(f"rlft GGUF import of the f16 export: max logit diff {diff:.3e} (logits up to {want.abs().max():.1f})")
    agree = (back.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"  top-1 agreement {agree:.1%} of {want.shape[1]} positions")
    assert diff < 0.2  # measured 6e-2: f16 rounding of 135M weights, on logits up to ~40
    assert agree >= 0.9  # only near-ties may flip


def run_in_onnxruntime(folder, ids: list[int], stops: set[int]):
    """In an isolated child (tests/isolation.py): onnxruntime's logits over ``ids`` and its greedy 32 tokens."""
    from rlft.export import OnnxCausalLM

    runtime = OnnxCausalLM(folder)
    logits, _ = runtime.step(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None], runtime.empty_cache(1))
    return logits, runtime.generate(ids, 32, stops)


def test_onnx_and_merged_exports_match_pytorch(smollm2_sft, tmp_path):
    _require("onnxruntime", "onnxruntime is not installed (rlft[export])")
    adapter, tokenizer, network = smollm2_sft
    merged = export_merged(str(adapter), tmp_path / "merged")
    # transformers alone; eager attention is the attention math the ONNX graph was exported with
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    ids = _prompt_ids(tokenizer, PROMPTS[2])
    with torch.no_grad():
        unmerged = network(torch.tensor([ids])).logits[0].numpy()
        want = plain(torch.tensor([ids])).logits[0].numpy()  # the PyTorch model the ONNX graph is exported from
    assert np.abs(want - unmerged).max() < 1e-3  # merging LoRA only reorders float sums

    start = time.perf_counter()
    folder = export_onnx(str(adapter), tmp_path / "onnx")
    exported_in = time.perf_counter() - start
    stops = stop_token_ids(tokenizer, network)
    logits, onnx_greedy = run_isolated(run_in_onnxruntime, folder, ids, set(stops), timeout=900)
    diff = np.abs(logits[0] - want).max()
    with torch.no_grad():
        greedy = plain.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=stops)[
            0, len(ids) :
        ].tolist()
    size = (tmp_path / "onnx" / "model.onnx").stat().st_size / 2**20
    scale = np.abs(want).max()
    print(
        f"ONNX: exported in {exported_in:.0f} s, {size:.0f} MiB, max logit diff vs PyTorch {diff:.2e} (logits up "
        f"to {scale:.1f}: {diff / scale:.1e} relative), greedy tokens equal: {onnx_greedy == greedy}"
    )
    assert diff < 1e-5 * scale  # measured 1.8e-6 relative (7.1e-5 on logits up to ~40); a wrong graph is off by > 1
    if onnx_greedy != greedy:  # thread counts reorder float sums: allowed to flip only where two tokens tie
        same = [a == b for a, b in zip(onnx_greedy, greedy, strict=False)]
        at = same.index(False) if False in same else len(same)
        assert at < len(greedy) and at < len(onnx_greedy), (onnx_greedy, greedy)
        with torch.no_grad():
            last = plain(torch.tensor([ids + greedy[:at]])).logits[0, -1]
        gap = (last[greedy[at]] - last[onnx_greedy[at]]).item()
        assert gap < 1e-4 * scale, f"greedy decoding diverged at token {at} with a logit gap of {gap:.2e}"
