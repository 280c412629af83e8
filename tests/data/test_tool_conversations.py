"""Tool-calling conversations in SFT data (TRL's format): assistant ``tool_calls`` are trained, ``tool`` results are
not, a row's ``tools`` reach the prompt (through the template's own ``tools=`` or a system message), bad rows are
refused naming the field, and a tiny SFT run on such rows learns through the CLI."""

from __future__ import annotations

import copy
import json

import pytest

from rlft.data.encoding import TemplateError, encode_sft
from rlft.data.errors import DataError
from rlft.data.formats import convert
from rlft.data.sources import Row
from rlft.data.tool_messages import template_inputs, template_renders_tool_calls
from rlft.logprobs import IGNORE_INDEX
from rlft.models import load_tokenizer
from tests.methods.conftest import cli_fit  # noqa: F401 - the fixture, for the end-to-end run

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
RESULT = "tool says 83810205"


def call(name: str = "calculator", arguments: object = None, **extra) -> dict:
    arguments = {"expression": "12345 * 6789"} if arguments is None else arguments
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def row(*, tools: object = (CALCULATOR,), arguments: object = '{"expression": "12345 * 6789"}') -> dict:
    """A TRL tool conversation: the call's arguments as OpenAI's JSON string, its content null."""
    data = {
        "messages": [
            {"role": "user", "content": "What is 12345 * 6789?"},
            {"role": "assistant", "content": None, "tool_calls": [call(arguments=arguments)]},
            {"role": "tool", "name": "calculator", "content": RESULT},
            {"role": "assistant", "content": "The product is 83,810,205."},
        ]
    }
    return {**data, "tools": list(tools)} if tools is not None else data


# A Qwen2.5-style template that renders `tools` and `tool_calls` itself (no such model is on this machine).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- '\\n\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tools_tokenizer():
    tokenizer = copy.deepcopy(load_tokenizer("tiny-qwen2"))
    tokenizer.chat_template = QWEN_TOOLS_TEMPLATE
    return tokenizer


def record(data: dict) -> dict:
    records, _ = convert([Row(data, "tools.jsonl", 1)], kind="sft", format="messages")
    return records[0]


def trained_and_prompt(tokenizer, rec: dict) -> tuple[str, str]:
    enc = encode_sft(tokenizer, rec["messages"], max_length=4096, tools=rec.get("tools"))
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    untrained = [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(trained), tokenizer.decode(untrained)


def test_rows_convert_to_canonical_tool_messages():
    rec = record(row())
    assert rec["tools"] == [CALCULATOR]
    assert rec["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call()]}  # arguments parsed
    assert rec["messages"][2] == {"role": "tool", "content": RESULT, "name": "calculator"}
    # hub datasets keep nested fields as JSON text, and give absent fields as null / []
    assert record({**row(), "tools": json.dumps([CALCULATOR])})["tools"] == [CALCULATOR]
    plain = record(
        {
            "messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "assistant", "content": "yo"}],
            "tools": None,
        }
    )
    assert plain == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tiny-llama"])
def test_calls_are_trained_in_the_models_format_and_tool_results_are_not(name, request):
    if name.startswith("smollm2"):
        request.getfixturevalue("smollm2")
    tokenizer = load_tokenizer(name)
    assert not template_renders_tool_calls(tokenizer)  # so the calls are written into the turn's text
    trained, prompt = trained_and_prompt(tokenizer, record(row()))
    call_text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345 * 6789"}}\n</tool_call>'
    assert call_text in trained and "The product is 83,810,205." in trained
    assert RESULT not in trained and "What is 12345" not in trained
    assert RESULT in prompt
    # the template shows no `tools`: the schema is listed in a system message, with the call format
    assert json.dumps(CALCULATOR) in prompt and "<tool_call></tool_call>" in prompt


def test_a_template_that_renders_tools_and_calls_gets_them_as_fields():
    tokenizer = qwen_tools_tokenizer()
    assert template_renders_tool_calls(tokenizer)
    rec = record(row())
    enc = encode_sft(tokenizer, rec["messages"], max_length=4096, tools=rec["tools"])
    shown, extra = template_inputs(tokenizer, rec["messages"], rec["tools"])
    assert extra == {"tools": [CALCULATOR]} and shown[1]["tool_calls"] == rec["messages"][1]["tool_calls"]
    full = tokenizer.apply_chat_template(shown, tools=rec["tools"], tokenize=False)
    assert enc.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]  # the template's own rendering
    assert "# Tools" in full and '"name": "calculator"' in full and "<tool_response>\n" + RESULT in full
    trained, prompt = trained_and_prompt(tokenizer, rec)
    expected = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345 * 6789"}}\n</tool_call><|im_end|>'
    )
    assert trained == expected + "The product is 83,810,205.<|im_end|>"
    assert RESULT in prompt and "Evaluate an arithmetic expression" in prompt


def test_a_call_with_text_and_two_calls_in_one_turn():
    data = row()
    data["messages"][1] = {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [call(), call(arguments={"expression": "1+1"})],
    }
    data["messages"].insert(3, {"role": "tool", "name": "calculator", "content": "2"})
    trained, _ = trained_and_prompt(load_tokenizer("tiny-llama"), record(data))
    assert trained.startswith("Let me check.\n<tool_call>") and trained.count("<tool_call>") == 2
    # a model whose own format holds one call per turn (Llama 3.1's json) cannot be trained on two: refused
    tokenizer = copy.deepcopy(load_tokenizer("tiny-llama"))
    tokenizer.chat_template += '{# ipython "parameters" #}'
    with pytest.raises(TemplateError, match="one call per assistant turn"):
        trained_and_prompt(tokenizer, record(data))


def bad(data: dict) -> str:
    with pytest.raises(DataError) as caught:
        convert([Row(data, "tools.jsonl", 7)], kind="sft", format="messages")
    (issue,) = caught.value.issues
    return str(issue)


def messages_with(index: int, message: dict | None, tools: object = (CALCULATOR,)) -> dict:
    data = row(tools=tools)
    if message is None:
        del data["messages"][index]
    else:
        data["messages"][index] = message
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (row(arguments="{'expression': 1}"), "field 'messages[1].tool_calls[0].function.arguments': is not valid JSON"),
        (row(arguments="[1, 2]"), "messages[1].tool_calls[0].function.arguments': expected an object"),
        (
            messages_with(1, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}),
            "field 'messages[1].tool_calls[0].function.name': expected the tool's name",
        ),
        (
            messages_with(1, {"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "x"}}]}),
            "messages[1].tool_calls[0].type': is 'code'",
        ),
        (
            messages_with(1, {"role": "assistant", "tool_calls": {"name": "x"}}),
            "messages[1].tool_calls': expected a list",
        ),
        (
            messages_with(0, {"role": "user", "content": "hi", "tool_calls": [call()]}),
            "messages[0].tool_calls': a 'user' message cannot make tool calls",
        ),
        (messages_with(1, None), "turn 2 is a 'tool' result (counting from 1, system included) without an assistant"),
        (
            messages_with(2, {"role": "user", "content": "well?"}),
            "turn 3 is 'user' right after an assistant turn with tool_calls",
        ),
        (messages_with(3, {"role": "user", "content": "and?"}), "turn 4 is 'user' right after a tool result"),
        (messages_with(2, {"role": "tool", "content": {"value": 1}}), "messages[2].content': found dict"),
        (messages_with(2, {"role": "tool", "content": None}), "messages[2].content': missing (or null)"),
        (messages_with(2, {"role": "tool", "content": "1", "tool_call_id": 3}), "messages[2].tool_call_id'"),
        ({**row(), "tools": {"name": "calculator"}}, "field 'tools': expected a list of tool JSON schemas"),
        (row(tools=[{"description": "no name"}]), "field 'tools[0]': expected a tool schema with a 'name'"),
        ({**row(), "tools": "[{"}, "field 'tools': is not valid JSON"),
    ],
)
def test_bad_tool_rows_are_refused_naming_the_field(data, expected):
    message = bad(data)
    assert message.startswith("tools.jsonl:7: ") and expected in message, message


def test_a_result_for_a_call_id_that_was_not_made_is_refused():
    data = row()
    data["messages"][1]["tool_calls"][0]["id"] = "call_a"
    data["messages"][2]["tool_call_id"] = "call_a"
    assert record(data)["messages"][2]["tool_call_id"] == "call_a"
    data["messages"][2]["tool_call_id"] = "call_b"
    assert "answers tool_call_id 'call_b', which no call of the assistant turn before it has" in bad(data)


def test_skip_invalid_counts_bad_tool_rows_and_pairs_refuse_tool_call_replies():
    rows = [
        Row(row(), "t.jsonl", 1),
        Row(row(arguments="{oops"), "t.jsonl", 2),
        Row(messages_with(1, None), "t.jsonl", 3),
    ]
    records, report = convert(rows, kind="sft", format="messages", on_invalid="skip")
    assert len(records) == 1 and report.filtered == {"invalid tool call": 1, "tool result without a call": 1}
    prompt = [{"role": "user", "content": "What is 12345 * 6789?"}]
    pair = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [call()]}],
        "rejected": "no",
    }
    with pytest.raises(DataError, match="final assistant reply holds tool_calls"):
        convert([Row(pair, "p.jsonl", 1)], kind="pairs")
    feedback = {"prompt": prompt, "completion": pair["chosen"], "label": True}
    with pytest.raises(DataError, match="final assistant reply holds tool_calls"):
        convert([Row(feedback, "u.jsonl", 1)], kind="unpaired")
    # a conversation may end on the call itself (a row teaching when to call)
    assert record({**row(), "messages": row()["messages"][:2]})["messages"][-1]["tool_calls"]


def test_tiny_sft_on_tool_conversations_through_the_cli_learns(cli_fit, tmp_path):  # noqa: F811
    rows = []
    for i in range(32):
        a, b = 100 + 7 * i, 3 + i
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} * {b}?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [call(arguments=json.dumps({"expression": f"{a} * {b}"}))],
                    },
                    {"role": "tool", "name": "calculator", "content": str(a * b)},
                    {"role": "assistant", "content": f"{a} * {b} = {a * b}."},
                ],
                "tools": [CALCULATOR],
            }
        )
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = cli_fit(
        "sft",
        "--data.init_args.path",
        str(data),
        "--data.init_args.limit",
        "8",
        "--data.init_args.shuffle",
        "false",
        "--data.init_args.max_length",
        "512",
        "--model.init_args.optim.lr",
        "1.0e-2",
        "--trainer.log_every_n_steps",
        "1",
        steps=20,
        validate=False,
    )
    losses = metrics.column("train/loss")
    print(f"\nSFT on tool conversations, tiny CLI: train losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4  # ~6.2 -> ~5.5 nats here
