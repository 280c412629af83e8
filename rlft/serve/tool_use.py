"""Tool use in ``rlft serve``: a chat request's ``tools``, assistant ``tool_calls`` and ``tool`` messages reach the
model exactly as SFT showed them in training (:func:`rlft.data.tool_messages.template_inputs`, the one shared rule),
and the reply is read back with :func:`rlft.data.tool_calls.parse_tool_calls` in the model's own format into OpenAI
``message.tool_calls`` with ``finish_reason: "tool_calls"``.

``tool_choice`` takes ``"auto"`` (the default) and ``"none"``; with ``"none"`` the tools are still shown (the
conversation renders as it did when they were offered) but the reply is returned as plain text. Forcing a call
(``"required"``, a named function) would need constrained decoding and is refused with a 400.
"""

from __future__ import annotations

import json
import logging
import uuid

from rlft.data.errors import RecordError
from rlft.data.tool_calls import parse_tool_calls, tool_call_format
from rlft.data.tool_messages import parse_tool_call_entries, parse_tools, template_inputs
from rlft.serve.protocol import APIError, ChatCompletionRequest

log = logging.getLogger(__name__)


def request_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools a chat request shows the model (``None`` without any); raises :class:`APIError` for a
    ``tool_choice`` this server cannot honour or a malformed ``tools`` list."""
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(
            400,
            f"tool_choice {json.dumps(body.tool_choice)} is not supported: rlft serve takes 'auto' or 'none' (forcing "
            "a call needs constrained decoding)",
            param="tool_choice",
        )
    try:
        return parse_tools(body.tools, "tools")
    except RecordError as error:
        raise APIError(400, str(error), param="tools") from error


def parses_calls(body: ChatCompletionRequest, tools: list[dict] | None) -> bool:
    """Whether replies are read for tool calls: tools were offered and ``tool_choice`` is not ``"none"``."""
    return bool(tools) and body.tool_choice != "none"


def request_messages(body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as chat-template dicts, each assistant's ``tool_calls`` checked and normalised (the
    arguments, a JSON string on the wire, as an object); raises ``ValueError`` naming the message's field."""
    messages = [m.as_dict() for m in body.messages]
    for index, message in enumerate(messages):
        if message.get("tool_calls"):
            if message["role"] != "assistant":
                raise ValueError(f"messages[{index}].tool_calls: only assistant messages make tool calls")
            message["tool_calls"] = parse_tool_call_entries(message["tool_calls"], f"messages[{index}].tool_calls")
    return messages


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[dict] | str:
    """What the engine generates from: the messages as the chat template takes them, or - when the template shows
    ``tools`` itself, which the engines' message path cannot pass - the prompt rendered to text."""
    shown, extra = template_inputs(tokenizer, messages, tools)
    if not extra:
        return shown
    return tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True, **extra)


def reply_message(text: str, finish_reason: str, tokenizer, parse: bool) -> tuple[dict, str]:
    """The OpenAI ``message`` of a generated reply and its finish reason.

    With ``parse``, calls written in the model's format become ``tool_calls`` (``content`` the text around them, or
    null) and the reason ``"tool_calls"``. A reply holding a call that does not parse comes back whole as text: the
    client sees what the model wrote rather than a call silently missing.
    """
    message = {"role": "assistant", "content": text}
    if not parse:
        return message, finish_reason
    turn = parse_tool_calls(text, tool_call_format(tokenizer))
    if turn.errors:
        log.warning("a reply's tool calls do not parse (%s); returned as text", "; ".join(turn.errors))
        return message, finish_reason
    if not turn.calls:
        return message, finish_reason
    calls = [{**call.as_openai(), "id": f"call_{uuid.uuid4().hex[:24]}"} for call in turn.calls]
    return {"role": "assistant", "content": turn.content or None, "tool_calls": calls}, "tool_calls"
