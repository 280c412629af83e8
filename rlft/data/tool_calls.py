"""Tool calls as text: how a model writes them, how rlft reads them back, and how tools are shown to it.

One format is shared by SFT rendering, multi-turn rollouts and ``rlft serve``, so a model trained on it is read back
the same way everywhere. Formats are registered by name (:data:`TOOL_CALL_FORMATS`):

``hermes`` (the default, Qwen2.5 / Hermes / SmolLM3 style): each call is a JSON object in its own tags::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12345 * 6789"}}
    </tool_call>

``json`` (Llama 3.1 style): the whole assistant turn is one JSON object ``{"name": ..., "parameters": {...}}``.

:func:`tool_call_format` picks the model's own format from its chat template (a template that writes
``<tool_call>`` is ``hermes``; one that writes ``"parameters"`` with an ``ipython`` role is ``json``) and falls back to
``hermes``. Tools reach the model through the template's own ``tools`` support where it has one; otherwise
:func:`with_tools` adds a system message that lists their JSON schemas and shows the format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlft.registry import resolve

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name, its arguments and an id the tool's answer refers to."""

    name: str
    arguments: dict = field(default_factory=dict)
    id: str = ""

    def as_openai(self) -> dict:
        """The OpenAI / TRL message form: ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
        the arguments as a JSON string (what the OpenAI API sends)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn read back: its text without the calls, the calls, and what could not be read."""

    content: str
    calls: list[ToolCall]
    errors: list[str]


def _call_from_object(value, where: str, number: int, arguments_key: str = "arguments") -> ToolCall | str:
    """A :class:`ToolCall` from a decoded JSON object, or the reason it is not one."""
    if not isinstance(value, dict):
        return f"{where}: expected a JSON object, got {type(value).__name__}"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return f"{where}: no 'name' string"
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):  # the OpenAI wire form: arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return f"{where}: 'arguments' is not valid JSON ({error.msg})"
    if not isinstance(arguments, dict):
        return f"{where}: 'arguments' must be an object, got {type(arguments).__name__}"
    return ToolCall(name, arguments, f"call_{number}")


def parse_hermes(text: str) -> ParsedTurn:
    """Calls in ``<tool_call>...</tool_call>`` tags; the content is the text outside them."""
    calls, errors = [], []
    for number, match in enumerate(_HERMES.finditer(text)):
        body = match.group(1).strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError as error:
            errors.append(f"tool call {number + 1}: not valid JSON ({error.msg})")
            continue
        parsed = _call_from_object(value, f"tool call {number + 1}", number)
        (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
    content = _HERMES.sub("", text)
    if "<tool_call>" in content:
        errors.append("a <tool_call> tag is not closed by </tool_call>")
        content = content[: content.index("<tool_call>")]
    return ParsedTurn(content.strip(), calls, errors)


def format_hermes(content: str, calls: Sequence[ToolCall]) -> str:
    blocks = [
        "<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) + "\n</tool_call>"
        for c in calls
    ]
    return "\n".join(([content] if content else []) + blocks)


def parse_json(text: str) -> ParsedTurn:
    """A turn that is exactly one JSON object with ``name`` and ``parameters`` is a call; any other turn is text."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return ParsedTurn(stripped, [], [])
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as error:
        return ParsedTurn("", [], [f"tool call 1: not valid JSON ({error.msg})"])
    parsed = _call_from_object(value, "tool call 1", 0, arguments_key="parameters")
    return ParsedTurn("", [parsed], []) if isinstance(parsed, ToolCall) else ParsedTurn("", [], [parsed])


def format_json(content: str, calls: Sequence[ToolCall]) -> str:
    if len(calls) > 1:
        raise ValueError("the json tool-call format holds one call per assistant turn")
    if not calls:
        return content
    return json.dumps({"name": calls[0].name, "parameters": calls[0].arguments}, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCallFormat:
    """How calls are written into, and read from, an assistant turn."""

    parse: Callable[[str], ParsedTurn]
    format: Callable[[str, Sequence[ToolCall]], str]
    instructions: str


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        parse_hermes,
        format_hermes,
        "To call a tool, write one JSON object per call inside <tool_call></tool_call> tags, e.g.\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments>}}\n</tool_call>\n'
        "then stop and wait: each result comes back in a `tool` message. Answer without tags when you are done.",
    ),
    "json": ToolCallFormat(
        parse_json,
        format_json,
        'To call a tool, reply with only a JSON object {"name": "<tool name>", "parameters": {<arguments>}}; '
        "its result comes back in a `tool` message. Answer in plain text when you are done.",
    ),
}


def get_tool_call_format(name: str | ToolCallFormat) -> ToolCallFormat:
    """The format registered as ``name`` (or the ``module:attribute`` it names, or the format itself)."""
    if isinstance(name, ToolCallFormat):
        return name
    return resolve(name, TOOL_CALL_FORMATS, "tool-call format")


def tool_call_format(tokenizer) -> str:
    """The name of the model's own tool-call format, read from its chat template; ``hermes`` when it shows none."""
    template = getattr(tokenizer, "chat_template", None) or ""
    template = (
        template if isinstance(template, str) else " ".join(template.values() if isinstance(template, dict) else [])
    )
    if "<tool_call>" in template:
        return "hermes"
    if '"parameters"' in template and "ipython" in template:
        return "json"
    return "hermes"


def parse_tool_calls(text: str, format: str | ToolCallFormat = "hermes") -> ParsedTurn:
    """The calls of an assistant turn's text in ``format``, the text around them and what could not be read."""
    return get_tool_call_format(format).parse(text)


def format_tool_calls(content: str, calls: Sequence[ToolCall | dict], format: str | ToolCallFormat = "hermes") -> str:
    """An assistant turn's text holding ``calls`` (``ToolCall`` or OpenAI/TRL ``tool_calls`` entries) in
    ``format``."""
    return get_tool_call_format(format).format(content, [as_tool_call(c, i) for i, c in enumerate(calls)])


def as_tool_call(value: ToolCall | dict, number: int = 0) -> ToolCall:
    """A :class:`ToolCall` from an OpenAI/TRL ``tool_calls`` entry (``{"function": {"name", "arguments"}}``, the
    arguments an object or a JSON string) or a plain ``{"name", "arguments"}``.

    Raises:
        ValueError: naming what is wrong with the entry.
    """
    if isinstance(value, ToolCall):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"tool_calls[{number}] must be an object, got {type(value).__name__}")
    function = value.get("function", value)
    parsed = _call_from_object(function, f"tool_calls[{number}]", number)
    if isinstance(parsed, str):
        raise ValueError(parsed)
    return ToolCall(parsed.name, parsed.arguments, str(value.get("id") or parsed.id))


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template shows the ``tools`` it is given (rendering with a probe tool changes the text)."""
    probe = [{"type": "function", "function": {"name": "rlft_probe_tool", "description": "", "parameters": {}}}]
    messages = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on `tools` does not support them  # noqa: BLE001
        return False
    return "rlft_probe_tool" in text


def with_tools(messages: list[dict], tools: Sequence[dict], format: str | ToolCallFormat = "hermes") -> list[dict]:
    """``messages`` with a system message (or the existing one, extended) that lists the tools' JSON schemas and the
    call format: for chat templates that do not render ``tools`` themselves."""
    fmt = get_tool_call_format(format)
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = f"You can use these tools:\n{listing}\n\n{fmt.instructions}"
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
