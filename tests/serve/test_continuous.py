"""Continuous batching in-process: requests that join and leave a running batch get exactly what they get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from rlft.generation.generator import Generator
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.models import load_model, load_tokenizer
from rlft.serve import ContinuousEngine, supports_continuous

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_QUESTION = [{"role": "user", "content": "Please summarise the following text in one sentence: " + "hello " * 12}]


def build(family: str, **kwargs) -> ContinuousEngine:
    tokenizer = load_tokenizer(f"tiny-{family}")
    model = load_model(f"tiny-{family}", trainable_adapter=False).eval()
    return ContinuousEngine(model, tokenizer, max_context=1024, **kwargs)


@pytest.fixture(scope="module")
def engine():
    engine = build("llama")
    yield engine
    engine.close()


def reference(engine: ContinuousEngine, prompt, max_new_tokens: int) -> str:
    """What ``model.generate`` answers for ``prompt`` alone (greedy)."""
    generator = Generator(engine.model, engine.tokenizer, DecoderSettings(backend="hf"))
    return generator.generate([prompt], SamplingSettings(max_new_tokens=max_new_tokens))[0][0]


def join_while_running(
    engine: ContinuousEngine,
    first,
    second,
    *,
    after_tokens: int = 3,
    first_max: int = 24,
    second_max: int = 10,
    **settings,
):
    """Submit ``first``; once it has streamed ``after_tokens`` deltas, submit ``second`` from inside the decode loop,
    so it joins the running batch. Returns both completions and whether ``second`` finished while ``first`` ran."""
    joined: list = []
    second_done_early = threading.Event()

    def on_first_delta(_: int, __: str) -> None:
        on_first_delta.count += 1
        if on_first_delta.count == after_tokens:
            joined.append(engine.submit([second], SamplingSettings(max_new_tokens=second_max, **settings)))
        elif joined and joined[0].done() and not first_future.done():
            second_done_early.set()

    on_first_delta.count = 0
    first_future = engine.submit(
        [first], SamplingSettings(max_new_tokens=first_max, **settings), on_delta=on_first_delta
    )
    first_result = first_future.result(timeout=120)
    return first_result, joined[0].result(timeout=120), second_done_early.is_set()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gpt2", "opt"])
def test_a_request_joining_mid_generation_gets_exactly_its_solo_greedy_answer(family, monkeypatch):
    from rlft.serve import continuous

    steps = []  # which path the engine decoded through: the lean step (Llama family) or the model's forward
    real = continuous.lean_step
    monkeypatch.setattr(continuous, "lean_step", lambda *a: steps.append(real(*a)) or steps[-1])
    engine = build(family)
    try:
        assert supports_continuous(engine.model)
        for first, second in ((QUESTION, LONG_QUESTION), (LONG_QUESTION, "The quick brown")):
            one, two, _ = join_while_running(engine, first, second)
            assert one.choices[0].text == reference(engine, first, 24)
            assert two.choices[0].text == reference(engine, second, 10)
        assert engine.stats()["peak_rows"] == 2  # they did share the batch
        assert steps and all((step is not None) == (family in ("llama", "qwen3")) for step in steps)
    finally:
        engine.close()


def test_a_short_request_leaves_the_batch_and_is_answered_before_a_long_one_ends(engine):
    before = engine.stats()
    _, short, answered_early = join_while_running(
        engine, LONG_QUESTION, QUESTION, first_max=40, second_max=3, after_tokens=2
    )
    assert short.choices[0].finish_reason == "length" and short.choices[0].completion_tokens == 3
    assert answered_early
    after = engine.stats()
    # the long request's 40 steps carried the short one for 3 of them: fewer rows per step than two full rows
    assert after["row_steps"] - before["row_steps"] < 2 * (after["decode_steps"] - before["decode_steps"])


def test_seeded_sampling_does_not_depend_on_what_else_is_in_the_batch(engine):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=3)
    alone = engine.submit(["Paris"], settings, seed=7).result(timeout=120)
    again = engine.submit(["Paris"], settings, seed=7).result(timeout=120)
    assert [c.text for c in alone.choices] == [c.text for c in again.choices]
    assert len({c.text for c in alone.choices}) > 1  # three different samples
    # the same seeded request, admitted while a greedy request is running
    joined: list = []

    def on_delta(_: int, __: str) -> None:
        if not joined:
            joined.append(engine.submit(["Paris"], settings, seed=7))

    engine.submit([QUESTION], SamplingSettings(max_new_tokens=16), on_delta=on_delta).result(timeout=120)
    assert [c.text for c in joined[0].result(timeout=120).choices] == [c.text for c in alone.choices]


def test_streaming_stop_strings_and_greedy_n(engine):
    free = engine.submit(["The quick brown"], SamplingSettings(max_new_tokens=16)).result(timeout=120).choices[0]
    assert free.finish_reason == "length" and len(free.text) > 4
    stop = free.text[2:4]
    deltas: dict[int, str] = {}

    def on_delta(index: int, text: str) -> None:
        deltas[index] = deltas.get(index, "") + text

    result = engine.submit(
        ["The quick brown"], SamplingSettings(max_new_tokens=16, stop=[stop], num_samples=2), on_delta=on_delta
    ).result(timeout=120)
    for choice in result.choices:
        assert choice.text == free.text[: free.text.find(stop)] and choice.finish_reason == "stop"
        assert deltas[choice.index] == choice.text  # nothing past the stop string was streamed
        assert choice.completion_tokens < 16  # the row left the batch at the stop string


def test_more_rows_than_the_batch_holds_wait_their_turn():
    engine = build("llama", max_batch_size=2)
    try:
        futures = [engine.submit([f"Count to {i}"], SamplingSettings(max_new_tokens=6)) for i in range(5)]
        wide = engine.submit(["Paris"], SamplingSettings(max_new_tokens=4, temperature=1.0, num_samples=3), seed=1)
        assert all(len(f.result(timeout=120).choices) == 1 for f in futures)
        assert len(wide.result(timeout=120).choices) == 3  # larger than the batch: it runs in chunks of 2 rows
        assert engine.stats()["peak_rows"] == 2 and engine.stats()["requests_served"] == 6
    finally:
        engine.close()


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    original = engine.lm.forward

    def broken(*args, **kwargs):
        monkeypatch.setattr(engine.lm, "forward", original)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.lm, "forward", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120)
    assert engine.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120).choices


def test_an_adapter_is_served_merged_and_restored_on_close(tmp_path):
    from tests.export.conftest import train_adapter

    adapter, _ = train_adapter("tiny-llama", tmp_path, steps=3, lr=1e-2)
    tokenizer = load_tokenizer(str(adapter))
    model = load_model(str(adapter), trainable_adapter=False).eval()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    expected = Generator(model, tokenizer, DecoderSettings(backend="hf")).generate(
        [QUESTION], SamplingSettings(max_new_tokens=12)
    )
    engine = ContinuousEngine(model, tokenizer, max_context=1024)
    try:
        got = engine.submit([QUESTION], SamplingSettings(max_new_tokens=12)).result(timeout=120).choices[0].text
    finally:
        engine.close()
    assert got == expected[0][0]
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_sliding_window_models_are_refused_with_the_alternative_named():
    model = load_model("tiny-mistral", trainable_adapter=False)
    model.config.sliding_window, model.config.layer_types = 8, ["sliding_attention"] * 2
    assert not supports_continuous(model)
    with pytest.raises(ValueError, match="--batching window"):
        ContinuousEngine(model, load_tokenizer("tiny-mistral"), max_context=1024)


def test_a_cancelled_request_leaves_the_batch_at_the_next_token(engine):
    before = engine.stats()
    futures: list = []
    cancelled = threading.Event()

    def on_delta(_: int, __: str) -> None:
        on_delta.count += 1
        if on_delta.count == 3:
            futures[0].cancel()  # what the server does when a streaming client disconnects
            cancelled.set()

    on_delta.count = 0
    futures.append(engine.submit([QUESTION], SamplingSettings(max_new_tokens=200), on_delta=on_delta))
    assert cancelled.wait(timeout=120)
    # the next request is answered, and the cancelled one stopped after a few of its 200 tokens
    assert engine.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120).choices
    after = engine.stats()
    assert futures[0].cancelled() and after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["decode_steps"] - before["decode_steps"] < 10


def test_rlft_serve_picks_continuous_batching_unless_told_otherwise():
    from rlft.cli.serve import build_engine
    from rlft.serve import Engine

    auto = build_engine("tiny-llama", device="cpu")
    window = build_engine("tiny-llama", device="cpu", batching="window")
    try:
        assert isinstance(auto, ContinuousEngine) and isinstance(window, Engine)
        assert window.stats() == {"generate_calls": 0, "requests_served": 0, "requests_cancelled": 0}
        assert window.submit(["ok"], SamplingSettings(max_new_tokens=2)).result(timeout=120).choices
        assert window.stats() == {"generate_calls": 1, "requests_served": 1, "requests_cancelled": 0}
    finally:
        auto.close()
        window.close()
