"""The registry of sampling backends: one signature, names resolved in one place, the same samples through it.

The evaluation/serving :class:`Generator` and rollouts both pick their backend from :mod:`rlft.generation.backends`;
these tests check that a greedy sample is the same token for token whichever backend draws it, that every backend
streams the same tokens to ``on_token``, and that evaluation's vLLM path (a folder engine, here the stand-in engine
of ``test_vllm``) comes back as the Hugging Face path's text.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rlft.generation.backends import SAMPLERS, batches_itself, get_sampler, hf_sample, register_sampler
from rlft.generation.decoder import decoder_sample
from rlft.generation.generator import Generator
from rlft.generation.request import SampleRequest
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.generation.vllm import vllm_sample
from rlft.models import load_model, load_tokenizer
from rlft.models.tokens import pad_token_id, stop_token_ids
from tests.generation.test_vllm import _LLM, _SamplingParams
from tests.rl.test_rollout import prompt_batch

QUESTIONS = [[{"role": "user", "content": "What is 2 + 2?"}], "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-llama", dtype="float32").eval(), load_tokenizer("tiny-llama")


def test_names_resolve_to_the_three_backends_and_unknown_names_are_refused():
    assert SAMPLERS == {"rlft": decoder_sample, "hf": hf_sample, "vllm": vllm_sample}
    assert get_sampler("hf") is hf_sample
    assert get_sampler("rlft.generation.decoder:decoder_sample") is decoder_sample  # module:function
    assert batches_itself(vllm_sample) and not batches_itself(hf_sample)
    with pytest.raises(ValueError, match=r"unknown sampling backend 'nope'; choose one of \['hf', 'rlft', 'vllm'\]"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="unknown sampling backend"):
        Generator(None, None, DecoderSettings(backend="nope"))


def test_a_registered_backend_serves_the_generator(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    monkeypatch.setitem(SAMPLERS, "counting", None)  # removed again after the test

    @register_sampler("counting")
    def counting(model, prompt_ids, prompt_mask, request: SampleRequest) -> torch.Tensor:
        calls.append(prompt_ids.shape[0])
        return hf_sample(model, prompt_ids, prompt_mask, request)

    settings = SamplingSettings(max_new_tokens=6)
    ours = Generator(model, tokenizer, DecoderSettings(backend="counting", batch_size=1)).generate(QUESTIONS, settings)
    assert calls == [1, 1]  # batch_size sequences per call
    assert ours == Generator(model, tokenizer, DecoderSettings(backend="hf", batch_size=1)).generate(
        QUESTIONS, settings
    )


def test_greedy_samples_are_the_same_through_every_torch_backend(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    request = SampleRequest(
        max_new_tokens=10,
        stop_ids=stop_token_ids(tokenizer, model),
        pad_id=pad_token_id(tokenizer),
        group_size=2,
        temperature=0.0,
    )
    ids, mask = batch.input_ids, batch.attention_mask
    ours, theirs = (get_sampler(name)(model, ids, mask, request) for name in ("rlft", "hf"))
    assert ours.shape[0] == theirs.shape[0] == 2 * ids.shape[0]  # rows of one prompt contiguous
    assert torch.equal(ours, theirs[:, : ours.shape[1]])
    assert (theirs[:, ours.shape[1] :] == request.pad_id).all()


def test_the_generator_samples_and_streams_the_same_through_rlft_and_hf(tiny):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=8, num_samples=2, stop=["\n"])
    results = {}
    for name in ("hf", "rlft"):
        streamed: dict = {}
        texts = Generator(model, tokenizer, DecoderSettings(backend=name)).generate(
            QUESTIONS, settings, on_token=lambda p, s, t, seen=streamed: seen.setdefault((p, s), []).append(t)
        )
        results[name] = texts, streamed
    assert results["rlft"] == results["hf"]
    texts, streamed = results["hf"]
    assert sorted(streamed) == [(0, 0), (1, 0)]  # greedy: one sample per prompt, repeated
    assert all(len(samples) == 2 and samples[0] == samples[1] for samples in texts)


def test_sampled_generation_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    generator = Generator(model, tokenizer, DecoderSettings(backend="hf"))
    torch.manual_seed(123)
    first = generator.generate(QUESTIONS, settings)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert generator.generate(QUESTIONS, settings) == first and torch.equal(torch.rand(1), after)
    assert all(len(samples) == 3 for samples in first)


def test_evaluation_vllm_path_returns_the_hf_text(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _LLM, _SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr("rlft.generation.generator.vllm_usable", lambda: True)
    generator = Generator(None, tokenizer, model_path=str(tmp_path))  # auto: vLLM, which loads the folder itself
    assert generator.backend_name == "vllm" and generator.options["engine"].llm.options["seed"] == 0
    settings = SamplingSettings(max_new_tokens=8, num_samples=2)
    streamed: dict = {}
    texts = generator.generate(QUESTIONS, settings, on_token=lambda p, s, t: streamed.setdefault((p, s), []).append(t))
    assert texts == Generator(model, tokenizer, DecoderSettings(backend="hf")).generate(
        QUESTIONS, settings, batch_size=1
    )
    assert sorted(streamed) == [(0, 0), (1, 0)] and all(streamed.values())
