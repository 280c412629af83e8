"""``rlft serve`` driven by the official ``openai`` client (and ``rlft eval judge``) over loopback HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rlft.generation.generator import Generator, encode_prompt_text
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.models import load_model, load_tokenizer

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install 'rlft[dev]')")

pytestmark = pytest.mark.timeout(600)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(served_adapter):
    server, _ = served_adapter
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(served_adapter):
    """The same adapter in this process, for the answers the server must give."""
    _, adapter = served_adapter
    tokenizer = load_tokenizer(str(adapter))
    return Generator(
        load_model(str(adapter), trainable_adapter=False).eval(), tokenizer, DecoderSettings(backend="hf")
    ), tokenizer


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny-sft"]
    assert client.models.retrieve("tiny-sft").id == "tiny-sft"


def test_chat_answer_equals_rlft_generation_and_counts_tokens(client, local):
    generator, tokenizer = local
    reply = client.chat.completions.create(model="tiny-sft", messages=QUESTION, max_tokens=16, temperature=0)
    expected = generator.generate([QUESTION], SamplingSettings(max_new_tokens=16))[0][0]
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(encode_prompt_text(tokenizer, QUESTION))
    assert 1 <= reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_adds_up_to_the_plain_answer(client):
    plain = client.chat.completions.create(model="tiny-sft", messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-sft",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == plain.choices[0].message.content
    assert chunks >= 4  # role, then token by token ("Score", ":", " 4"), then the finish: not one block
    assert finish == plain.choices[0].finish_reason and usage.completion_tokens == plain.usage.completion_tokens


def test_completions_with_n_seed_stop_and_several_prompts(client):
    kwargs = dict(
        model="tiny-sft",
        prompt=["The quick brown", "Paris is"],
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        n=2,
        seed=11,
    )
    first = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in client.completions.create(**kwargs).choices] == [c.text for c in first.choices]
    greedy = client.completions.create(model="tiny-sft", prompt="The quick brown", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert len(text) > 3
    stopped = client.completions.create(
        model="tiny-sft", prompt="The quick brown", max_tokens=12, temperature=0, stop=[text[1:3]]
    )
    assert stopped.choices[0].text == text[: text.find(text[1:3])] and stopped.choices[0].finish_reason == "stop"


def test_twenty_concurrent_clients_are_all_answered_in_shared_batches(client, served_adapter):
    server, _ = served_adapter
    before = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
    expected = client.chat.completions.create(model="tiny-sft", messages=QUESTION, max_tokens=12, temperature=0)

    def ask(i: int) -> str:
        if i % 2:  # half of them stream
            stream = client.chat.completions.create(
                model="tiny-sft", messages=QUESTION, max_tokens=12, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model="tiny-sft", messages=QUESTION, max_tokens=12, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20)))
    after = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
    assert answers == [expected.choices[0].message.content] * 20  # none lost, none mixed up
    assert after["engine"] == "rlft continuous batching"
    served = after["requests_served"] - before["requests_served"] - 1
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["row_steps"] - before["row_steps"]
    assert served == 20 and rows > 2 * steps, (served, steps, rows)  # requests shared forwards
    print(f"20 concurrent clients: {steps} decode steps, {rows / steps:.1f} rows per step")


def test_bad_requests_get_clear_4xx_errors(client, served_adapter):
    server, _ = served_adapter
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048"):
        client.chat.completions.create(model="tiny-sft", messages=QUESTION, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater than or equal to 1"):
        client.chat.completions.create(model="tiny-sft", messages=QUESTION, n=0)
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model="tiny-sft", prompt="x", stop=["a", "b", "c", "d", "e"])
    broken = httpx.post(
        f"{server.base_url}/chat/completions",
        content=b'{"model": "tiny-sft", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    missing = httpx.post(f"{server.base_url}/completions", json={"model": "tiny-sft"})
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]


def test_rlft_eval_judge_uses_the_server_as_its_judge(served_adapter, tmp_path):
    from rlft.cli.eval import main as eval_main

    server, adapter = served_adapter
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Name a colour.", "What is 2 + 2?")))
    eval_main(
        [
            "judge",
            str(adapter),
            str(prompts),
            "--api_base",
            server.base_url,
            "--api_model",
            "tiny-sft",
            "--limit",
            "2",
            "--max_new_tokens",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    metrics = json.loads((tmp_path / "judge_pointwise.json").read_text())["metrics"]
    assert metrics["n"] == metrics["scored"] == 2 and metrics["unparseable"] == 0
    assert metrics["mean_score"] == 4.0  # the served model's verdict, parsed from its HTTP replies
    cached = [json.loads(line) for line in (tmp_path / "judge_cache.jsonl").read_text().splitlines()]
    assert [c["reply"] for c in cached] == ["Score: 4", "Score: 4"]


def test_a_streaming_client_that_disconnects_stops_its_generation(served_adapter):
    server, _ = served_adapter
    health = server.base_url.removesuffix("/v1") + "/health"
    before = httpx.get(health).json()
    body = {
        "model": "tiny-sft",
        "prompt": "The quick brown",
        "max_tokens": 1500,
        "temperature": 1.0,
        "stream": True,
        "seed": 3,
    }
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # first token seen: hang up
    deadline = time.monotonic() + 60
    while (after := httpx.get(health).json())["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after["requests_served"] == before["requests_served"]  # it was dropped, not run to 1,500 tokens
