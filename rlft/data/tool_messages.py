"""Tool-calling conversations (TRL's / OpenAI's message fields): reading them from data, and what a chat template
is given for them.

Data rows and API requests carry tool use as OpenAI/TRL fields: an assistant message may hold ``tool_calls``
(``[{"type": "function", "function": {"name": str, "arguments": dict or JSON string}}]``, its ``content`` then
possibly empty), a ``{"role": "tool", "content": str, "name"?, "tool_call_id"?}`` message carries a tool's result,
and a row-level ``tools`` list holds the tools' JSON schemas. The parsers here turn those fields into one canonical
form (arguments as objects) with errors naming the field; :func:`template_inputs` is the one place that decides how
such a conversation reaches the chat template, for SFT encoding (:mod:`rlft.data.encoding`) and ``rlft serve`` alike:

* ``tool_calls`` pass through when the template renders them itself (Qwen2.5, Hermes), and are otherwise written
  into the assistant turn's text in the model's own format (:func:`~rlft.data.tool_calls.format_tool_calls`) - a
  template that ignores the field would silently drop the calls, and the model would be trained on empty turns;
* ``tools`` go to the template's own ``tools=`` argument when it shows them, and otherwise into a system message
  (:func:`~rlft.data.tool_calls.with_tools`).
"""

from __future__ import annotations

import json

from rlft.data.errors import RecordError, describe_value
from rlft.data.tool_calls import format_tool_calls, template_renders_tools, tool_call_format, with_tools

__all__ = [
    "has_tool_calls",
    "parse_tool_call_entries",
    "parse_tools",
    "refuse_tool_call_reply",
    "template_inputs",
    "template_renders_tool_calls",
]

# probe results per chat template: probing renders the template, and SFT data asks once per row
_PROBED: dict[tuple[str, str], bool] = {}


def _json_value(value: object, where: str) -> object:
    """``value``, or the value its JSON text holds (hub datasets often store nested fields as JSON strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as error:
        raise RecordError(
            where, f"is not valid JSON ({error.msg} at character {error.pos})", "invalid tool call"
        ) from None


def parse_tool_call_entries(value: object, where: str) -> list[dict]:
    """The ``tool_calls`` of an assistant message as ``[{"type": "function", "function": {"name", "arguments"}}]``
    (arguments an object, ``id`` kept when given); raises :class:`RecordError` naming the entry's field."""
    if not isinstance(value, list):
        raise RecordError(
            where,
            f"expected a list of {{type, function: {{name, arguments}}}}, found {describe_value(value)}",
            "wrong type",
        )
    calls = []
    for index, entry in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise RecordError(at, f"expected an object, found {describe_value(entry)}", "invalid tool call")
        if entry.get("type", "function") != "function":
            raise RecordError(
                f"{at}.type", f"is {entry['type']!r}; only 'function' calls are supported", "invalid tool call"
            )
        function = entry.get("function")
        if not isinstance(function, dict):
            raise RecordError(
                f"{at}.function",
                f"expected an object {{name, arguments}}, found {describe_value(function)}",
                "invalid tool call",
            )
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RecordError(
                f"{at}.function.name", f"expected the tool's name, found {describe_value(name)}", "invalid tool call"
            )
        arguments = _json_value(function.get("arguments", {}), f"{at}.function.arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RecordError(
                f"{at}.function.arguments",
                f"expected an object (or its JSON text), found {describe_value(arguments)}",
                "invalid tool call",
            )
        call: dict = {"type": "function", "function": {"name": name.strip(), "arguments": arguments}}
        if entry.get("id") is not None:
            if not isinstance(entry["id"], str):
                raise RecordError(f"{at}.id", f"expected a string, found {describe_value(entry['id'])}", "wrong type")
            call["id"] = entry["id"]
        calls.append(call)
    return calls


def parse_tools(value: object, where: str = "tools") -> list[dict] | None:
    """A row's ``tools``: a list of JSON schemas (``{"type": "function", "function": {"name", ...}}`` or a bare
    ``{"name", "description", "parameters"}``), or its JSON text; ``None`` when absent or empty."""
    value = _json_value(value, where) if isinstance(value, str) and value.strip() else value
    if value is None or value == [] or value == "":
        return None
    if not isinstance(value, list):
        raise RecordError(where, f"expected a list of tool JSON schemas, found {describe_value(value)}", "wrong type")
    for index, tool in enumerate(value):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not schema["name"]:
            raise RecordError(
                f"{where}[{index}]",
                f"expected a tool schema with a 'name' (or function.name), found {describe_value(tool)}",
                "invalid tool schema",
            )
    return value


def refuse_tool_call_reply(message: dict, where: str) -> None:
    """Refuse a final reply holding tool calls where the reply must be one string (pairs, unpaired feedback): the
    calls cannot be written out before the model's format is known, and dropping them would compare empty texts."""
    if message.get("tool_calls"):
        raise RecordError(
            where,
            "the final assistant reply holds tool_calls; a chosen/rejected or completion reply must be text "
            "(train tool calls with SFT, or write the call into the reply's text)",
            "tool call reply",
        )


def has_tool_calls(messages: list[dict]) -> bool:
    return any(m.get("tool_calls") for m in messages)


def template_renders_tool_calls(tokenizer) -> bool:
    """Whether the chat template writes an assistant message's ``tool_calls`` (a probe call's name shows up)."""
    template = getattr(tokenizer, "chat_template", None)
    key = (json.dumps(template, sort_keys=True, default=str), "tool_calls")
    if key not in _PROBED:
        call = {"type": "function", "function": {"name": "rlft_probe_call", "arguments": {}}}
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that fails on tool_calls does not render them  # noqa: BLE001
            text = ""
        _PROBED[key] = "rlft_probe_call" in text
    return _PROBED[key]


def _renders_tools(tokenizer) -> bool:
    key = (json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str), "tools")
    if key not in _PROBED:
        _PROBED[key] = template_renders_tools(tokenizer)
    return _PROBED[key]


def template_inputs(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[dict], dict]:
    """``(messages, extra apply_chat_template arguments)`` that show ``messages`` (with their tool calls and tool
    results) and ``tools`` to this tokenizer's chat template. A conversation without either comes back unchanged.

    Raises:
        ValueError: A tool call cannot be written in the model's format (the ``json`` format holds one call per
            turn) or is malformed.
    """
    if not tools and not has_tool_calls(messages):
        return messages, {}
    fmt = tool_call_format(tokenizer)
    native = template_renders_tool_calls(tokenizer)
    shown = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            shown.append(message)
        elif native:  # arguments as objects: templates write them with `tojson`, a JSON string would be quoted twice
            normalised = parse_tool_call_entries(calls, "tool_calls")
            shown.append({**message, "content": message.get("content") or "", "tool_calls": normalised})
        else:
            rest = {k: v for k, v in message.items() if k not in ("tool_calls", "content")}
            shown.append({**rest, "content": format_tool_calls(message.get("content") or "", calls, fmt)})
    if not tools:
        return shown, {}
    if _renders_tools(tokenizer):
        return shown, {"tools": list(tools)}
    return with_tools(shown, tools, fmt), {}
