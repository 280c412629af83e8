"""OpenAI ``tools`` / ``tool_calls`` in ``rlft serve``, driven by the official ``openai`` client over loopback HTTP.

The engine here is scripted: it answers with a text the test sets and records the prompt it was given, so the
tests see exactly what the model would have seen and control what it "wrote" (a hermes tool call, plain text)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from rlft.data.encoding import encode_prompt
from rlft.data.formats import convert
from rlft.data.sources import Row
from rlft.generation.generator import encode_prompt_text
from rlft.models import load_tokenizer
from rlft.serve import create_app
from rlft.serve.engine import Choice, Completion
from tests.data.test_tool_conversations import CALCULATOR, qwen_tools_tokenizer

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install 'rlft[dev]')")

pytestmark = pytest.mark.timeout(120)
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345 * 6789"}}\n</tool_call>'
QUESTION = {"role": "user", "content": "What is 12345 * 6789?"}


class ScriptedEngine:
    """Every request is answered with ``reply`` (streamed in three pieces); ``prompts`` are what it was given."""

    backend_name, max_context = "scripted", 4096

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.reply, self.prompts = tokenizer, "", []

    def stats(self) -> dict:
        return {}

    def encode(self, prompt) -> list[int]:
        return encode_prompt_text(self.tokenizer, prompt)

    def submit(self, prompts, settings, *, seed=None, on_delta=None, prompt_tokens=None, encoded=None) -> Future:
        self.prompts += list(prompts)
        n, third = settings.num_samples, max(1, len(self.reply) // 3)
        choices = []
        for index in range(len(prompts) * n):
            for start in range(0, len(self.reply), third):
                if on_delta is not None:
                    on_delta(index, self.reply[start : start + third])
            choices.append(Choice(index, self.reply, "stop", 5))
        future: Future = Future()
        future.set_result(Completion(choices, prompt_tokens or 0))
        return future

    def last_prompt_text(self) -> str:
        return self.tokenizer.decode(self.encode(self.prompts[-1]))


@pytest.fixture(scope="module")
def served():
    """``(openai client, engine)`` of an in-process server on a free loopback port."""
    import uvicorn

    engine = ScriptedEngine(load_tokenizer("tiny-qwen2"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, engine
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def engine(served):
    _, engine = served
    tokenizer = engine.tokenizer
    yield engine
    engine.tokenizer = tokenizer


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, **kwargs)


def test_a_reply_with_a_call_comes_back_as_tool_calls(served, engine):
    client, _ = served
    engine.reply = "Let me compute that.\n" + CALL
    reply = ask(client, [QUESTION], tools=[CALCULATOR])
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12345 * 6789"}
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute that."
    # this template shows no tools: they reach the model in a system message listing the schema and the format
    seen = engine.last_prompt_text()
    assert json.dumps(CALCULATOR) in seen and "<tool_call></tool_call>" in seen
    engine.reply = CALL
    assert ask(client, [QUESTION], tools=[CALCULATOR]).choices[0].message.content is None  # nothing around the call


def test_a_follow_up_with_the_call_and_its_result_is_rendered_as_sft_renders_it(served, engine):
    client, _ = served
    engine.reply = "It is 83,810,205."
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "12345 * 6789"}'},
    }
    messages = [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "83810205"},
    ]
    reply = ask(client, messages, tools=[CALCULATOR])
    assert reply.choices[0].message.content == "It is 83,810,205." and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    seen = engine.last_prompt_text()
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>" in seen and "<|im_start|>tool\n83810205<|im_end|>" in seen
    # token for token the prompt SFT trains the model on for the same conversation (one shared rendering)
    (record,), _ = convert([Row({"messages": messages, "tools": [CALCULATOR]}, "x", 1)], kind="prompts")
    sft = encode_prompt(engine.tokenizer, record["prompt"], tools=record["tools"]).input_ids
    assert engine.encode(engine.prompts[-1]) == sft


def test_a_template_that_renders_tools_gets_them_through_its_own_tools_argument(served, engine):
    client, _ = served
    engine.tokenizer = qwen_tools_tokenizer()
    engine.reply = CALL
    messages = [
        QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "83810205"},
    ]
    reply = ask(client, messages, tools=[CALCULATOR])
    assert reply.choices[0].message.tool_calls[0].function.name == "calculator"
    seen = engine.prompts[-1]
    assert isinstance(seen, str) and "# Tools\n<tools>\n" + json.dumps(CALCULATOR) in seen
    assert '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>' in seen
    assert "<tool_response>\n83810205\n</tool_response>" in seen and seen.endswith("<|im_start|>assistant\n")


def test_streaming_with_tools_sends_the_calls_as_one_delta_at_the_end(served, engine):
    client, _ = served
    engine.reply = "Checking.\n" + CALL
    stream = ask(client, [QUESTION], tools=[CALCULATOR], stream=True)
    content, calls, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert "".join(content) == "Checking." and finish == "tool_calls"
    (call,) = calls
    assert call.index == 0 and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12345 * 6789"}
    # without tools the reply streams as text, piece by piece
    pieces = [c.choices[0].delta.content for c in ask(client, [QUESTION], stream=True) if c.choices]
    assert "".join(p or "" for p in pieces) == engine.reply and len([p for p in pieces if p]) >= 3


def test_replies_stay_text_without_tools_with_tool_choice_none_or_a_call_that_does_not_parse(served, engine):
    client, _ = served
    engine.reply = CALL
    for kwargs in ({}, {"tools": [CALCULATOR], "tool_choice": "none"}):
        choice = ask(client, [QUESTION], **kwargs).choices[0]
        assert choice.message.content == CALL and choice.message.tool_calls is None and choice.finish_reason == "stop"
    engine.reply = "<tool_call>\n{not json}\n</tool_call>"
    choice = ask(client, [QUESTION], tools=[CALCULATOR], tool_choice="auto").choices[0]
    assert choice.message.content == engine.reply and choice.message.tool_calls is None  # what the model wrote


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"tools": [CALCULATOR], "tool_choice": "required"}, 'tool_choice "required" is not supported'),
        (
            {"tools": [CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "calculator"}}},
            "is not supported: rlft serve takes 'auto' or 'none'",
        ),
        ({"tools": [{"description": "nameless"}]}, "field 'tools[0]': expected a tool schema with a 'name'"),
    ],
)
def test_unsupported_tool_choices_and_bad_tools_get_a_400_naming_them(served, kwargs, expected):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [QUESTION], **kwargs)
    assert expected in caught.value.response.json()["error"]["message"]


def test_a_malformed_call_in_the_request_messages_gets_a_400_naming_the_field(served):
    client, _ = served
    bad = {"type": "function", "function": {"name": "calculator", "arguments": "{oops"}}
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [QUESTION, {"role": "assistant", "content": None, "tool_calls": [bad]}], tools=[CALCULATOR])
    error = caught.value.response.json()["error"]
    assert "field 'messages[1].tool_calls[0].function.arguments': is not valid JSON" in error["message"]
    assert error["param"] == "messages"
