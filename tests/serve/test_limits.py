"""Request limits of the server, over real HTTP to an in-process uvicorn: one request cannot take the server's memory
(prompt count, ``n``, prompt bytes, rows in chunks of the batch size), its event loop (tokenising off the loop) or its
decode thread after the client has gone (a non-streaming request is cancelled on disconnect)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from rlft.models import load_model, load_tokenizer
from rlft.serve import ContinuousEngine, create_app
from rlft.serve.limits import RequestLimits

pytestmark = pytest.mark.timeout(300)
LIMITS = RequestLimits(max_prompts_per_request=8, max_n=4, max_prompt_bytes=1 << 20)
MAX_BATCH = 4


@pytest.fixture(scope="module")
def server():
    """``(base url, engine)`` of tiny-llama served continuously with small limits, on a free loopback port."""
    import uvicorn

    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", trainable_adapter=False).eval()
    engine = ContinuousEngine(model, tokenizer, max_context=2048, max_batch_size=MAX_BATCH)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(engine, "tiny", default_max_tokens=8, limits=LIMITS)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield base, engine
    uv.should_exit = True
    thread.join(timeout=30)
    engine.close()


def post(base: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": "tiny", **body}, timeout=120, **kwargs)


def error_of(response: httpx.Response) -> str:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # the OpenAI error shape the client parses
    return error["message"]


def test_requests_over_the_limits_get_openai_errors_naming_the_limit(server):
    base, _ = server
    many = post(base, {"prompt": ["hi"] * 9})
    assert many.status_code == 400 and "9 prompts" in error_of(many) and "at most 8" in error_of(many)
    wide = post(base, {"prompt": "hi", "n": 5})
    assert wide.status_code == 400 and "at most 4" in error_of(wide) and wide.json()["error"]["param"] == "n"
    for seed in (2**64, 2**63, -1):  # 2**64 used to be a 500 from torch's generator
        bad_seed = post(base, {"prompt": "hi", "seed": seed})
        assert bad_seed.status_code == 400 and "seed" in error_of(bad_seed), bad_seed.text
    assert post(base, {"prompt": "hi", "seed": 2**63 - 1, "max_tokens": 2, "temperature": 1}).status_code == 200
    no_tokens = post(base, {"prompt": "hi", "max_tokens": 0})
    assert no_tokens.status_code == 400 and "max_tokens" in error_of(no_tokens)
    too_long = post(base, {"prompt": "hello " * 3000, "max_tokens": 4})
    assert too_long.status_code == 400 and "maximum context length is 2048" in error_of(too_long)
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    big = post(base, {"prompt": "x" * ((1 << 20) + 1)})
    assert big.status_code == 413 and "1,048,577 bytes" in error_of(big) and "at most 1,048,576" in error_of(big)
    message = {"role": "user", "content": "é" * (1 << 19) + "x"}  # 524,289 characters, 1,048,577 bytes
    chat = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": [message]}, timeout=120)
    assert chat.status_code == 413 and chat.json()["error"]["param"] == "messages"  # bytes, not characters


def test_a_body_over_the_cap_is_refused_before_it_is_parsed(server):
    base, _ = server
    body = b'{"model": "tiny", "prompt": "' + b"x" * (LIMITS.max_body_bytes + 1) + b'"}'
    started = time.monotonic()
    response = httpx.post(f"{base}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "request body is larger than" in error_of(response)
    assert time.monotonic() - started < 5
    assert httpx.get(f"{base}/health").status_code == 200

    def chunks():  # no Content-Length: the cap counts the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(LIMITS.max_body_bytes // (1 << 16) + 2):
            yield b"x" * (1 << 16)
        yield b'"}'

    streamed = httpx.post(f"{base}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "request body is larger than" in error_of(streamed)


def test_rows_beyond_the_batch_size_run_in_chunks_and_all_come_back(server):
    base, engine = server
    before = engine.stats()
    reply = post(
        base, {"prompt": [f"Count to {i}" for i in range(8)], "n": 4, "max_tokens": 3, "temperature": 1.0, "seed": 5}
    )
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["index"] for c in choices] == list(range(32))
    after = engine.stats()
    assert after["peak_rows"] <= MAX_BATCH  # 32 rows, never more than 4 in the batch (and its KV cache) at once
    assert after["prefills"] - before["prefills"] >= 32 // MAX_BATCH
    again = post(
        base, {"prompt": [f"Count to {i}" for i in range(8)], "n": 4, "max_tokens": 3, "temperature": 1.0, "seed": 5}
    )
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices]  # chunking keeps seeds exact


def test_health_answers_while_a_large_prompt_is_tokenised(server):
    base, _ = server
    prompt = "hello world " * ((1 << 20) // 12)  # just under the byte limit; ~200k tokens, too long for the context
    answer: dict = {}

    def send() -> None:
        started = time.monotonic()
        answer["response"] = post(base, {"prompt": prompt, "max_tokens": 4})
        answer["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=send)
    thread.start()
    latencies = []
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    thread.join()
    assert answer["response"].status_code == 400 and "maximum context length" in error_of(answer["response"])
    print(
        f"1 MiB prompt answered in {answer['seconds']:.2f} s; /health x{len(latencies)} during it, "
        f"slowest {max(latencies, default=0):.3f} s"
    )
    assert len(latencies) >= 2 and max(latencies) < 1.0


def test_a_non_streaming_client_that_disconnects_stops_its_generation(server, monkeypatch):
    base, engine = server
    monkeypatch.setattr(engine, "stop_ids", set())  # the random tiny model must not end its reply by chance
    assert post(base, {"prompt": "warm up", "max_tokens": 4}).status_code == 200
    before = engine.stats()
    body = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 2000, "temperature": 1.0, "seed": 3}
    # the client gives up after 0.4 s and closes its connection (a quiet machine decodes the 2,000 tokens of this
    # 2-layer model in about a second, so a later give-up would race the end of the reply)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.4))
    deadline = time.monotonic() + 30
    while (after := engine.stats())["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    decoded = engine.stats()["row_steps"] - before["row_steps"]
    time.sleep(0.5)
    assert engine.stats()["row_steps"] - before["row_steps"] == decoded  # nothing decoded after the cancel
    assert after["requests_served"] == before["requests_served"]  # dropped, not run to 2,000 tokens
    assert decoded < 2000, decoded
    print(f"client left after 0.4 s: {decoded} of 2000 tokens decoded, then the request was dropped")


def test_the_windowed_engine_chunks_rows_and_stops_for_cancelled_requests(monkeypatch):
    from rlft.generation.generator import Generator
    from rlft.generation.settings import DecoderSettings, SamplingSettings
    from rlft.serve import Engine

    tokenizer = load_tokenizer("tiny-llama")
    generator = Generator(
        load_model("tiny-llama", trainable_adapter=False).eval(), tokenizer, DecoderSettings(backend="hf")
    )
    engine = Engine(generator, tokenizer, max_context=2048, batch_window_ms=1, max_batch_size=MAX_BATCH)
    seen: list[int] = []
    sample = generator.sample

    def recording(model, prompt_ids, prompt_mask, request):
        seen.append(prompt_ids.shape[0] * request.group_size)
        return sample(model, prompt_ids, prompt_mask, request)

    monkeypatch.setattr(generator, "sample", recording)
    try:
        wide = engine.submit(
            [f"Count to {i}" for i in range(8)],
            SamplingSettings(max_new_tokens=2, temperature=1.0, num_samples=2),
            seed=1,
        )
        assert len(wide.result(timeout=120).choices) == 16
        assert seen == [MAX_BATCH] * 4  # 8 prompts in chunks of 2 prompts x 2 samples = 4 rows per forward
        deltas: list[str] = []

        def hang_up_after_three(_: int, text: str) -> None:  # what the server does when the client goes away
            deltas.append(text)
            if len(deltas) == 3:
                future.cancel()

        future = engine.submit(["The quick brown"], SamplingSettings(max_new_tokens=1500), on_delta=hang_up_after_three)
        deadline = time.monotonic() + 60
        while engine.stats()["requests_cancelled"] == 0:
            assert time.monotonic() < deadline and not (future.done() and not future.cancelled())
            time.sleep(0.05)
        assert future.cancelled() and engine.stats()["requests_served"] == 1 and len(deltas) == 3
    finally:
        engine.close()
