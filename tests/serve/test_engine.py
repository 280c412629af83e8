"""The serving engine in-process: batching, streaming deltas, finish reasons and token counts on a tiny model."""

from __future__ import annotations

import threading

import pytest

from rlft.generation.generator import Generator, encode_prompt_text
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.models import load_model, load_tokenizer
from rlft.serve import Engine


@pytest.fixture(scope="module")
def engine():
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", trainable_adapter=False).eval()
    engine = Engine(
        Generator(model, tokenizer, DecoderSettings(backend="hf")), tokenizer, max_context=2048, batch_window_ms=200
    )
    yield engine
    engine.close()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_concurrent_requests_share_one_generate_and_match_unbatched_generation(engine):
    prompts = [chat("What is the capital of France?")] * 6
    settings = SamplingSettings(max_new_tokens=12)
    calls_before = len(engine.batches)
    futures = [None] * 6

    def submit(i: int) -> None:
        futures[i] = engine.submit([prompts[i]], settings)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(timeout=120) for f in futures]
    assert len(engine.batches) - calls_before < 6  # at least two requests went through one generate call
    direct = engine.generator.generate([prompts[0]], settings)[0][0]
    assert all(r.choices[0].text == direct for r in results)
    expected_prompt = len(encode_prompt_text(engine.tokenizer, prompts[0]))
    assert all(r.prompt_tokens == expected_prompt for r in results)
    assert all(1 <= r.completion_tokens <= 12 for r in results)


def test_streamed_deltas_add_up_to_the_final_text_for_every_choice(engine):
    deltas: dict[int, str] = {}

    def on_delta(index: int, text: str) -> None:
        deltas[index] = deltas.get(index, "") + text

    settings = SamplingSettings(max_new_tokens=10, num_samples=3)  # greedy n=3: three identical choices
    result = engine.submit([chat("Say hello"), "The quick brown"], settings, on_delta=on_delta).result(timeout=120)
    assert [c.index for c in result.choices] == list(range(6))
    assert {i: c.text for i, c in enumerate(result.choices)} == {i: deltas.get(i, "") for i in range(6)}
    assert result.choices[0].text == result.choices[1].text == result.choices[2].text
    for choice in result.choices:
        assert choice.finish_reason in ("stop", "length")
        assert (choice.finish_reason == "length") == (choice.completion_tokens == 10)


def test_stop_strings_cut_the_text_and_end_with_stop(engine):
    free = engine.submit(["The quick brown"], SamplingSettings(max_new_tokens=16)).result(timeout=120).choices[0]
    assert free.finish_reason == "length" and len(free.text) > 4
    stop = free.text[2:4]
    deltas: list[str] = []
    cut = (
        engine.submit(
            ["The quick brown"],
            SamplingSettings(max_new_tokens=16, stop=[stop]),
            on_delta=lambda i, t: deltas.append(t),
        )
        .result(timeout=120)
        .choices[0]
    )
    assert cut.text == free.text[: free.text.find(stop)] and stop not in cut.text
    assert cut.finish_reason == "stop" and "".join(deltas) == cut.text  # nothing past the stop was streamed


def test_seeded_sampling_is_reproducible_and_unseeded_sampling_varies(engine):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, num_samples=2)
    first = engine.submit(["Paris"], settings, seed=7).result(timeout=120)
    again = engine.submit(["Paris"], settings, seed=7).result(timeout=120)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    unseeded = {engine.submit(["Paris"], settings).result(timeout=120).choices[0].text for _ in range(4)}
    assert len(unseeded) > 1


def test_a_failing_generation_reaches_the_client_and_the_engine_goes_on(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.generator, "generate", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120)
    monkeypatch.undo()
    assert engine.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120).choices
