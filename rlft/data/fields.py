"""Parsing and validation of the fields that input formats are made of (texts, message lists, transcripts).

Every function raises :class:`~rlft.data.errors.RecordError` naming the field, what was expected and what was
found; :func:`rlft.data.formats.convert` adds the file and line. All texts are stripped of surrounding whitespace
here, in one place, so chosen and rejected replies compare meaningfully whatever format they came from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from rlft.data.errors import RecordError, describe_value
from rlft.data.tool_messages import parse_tool_call_entries, refuse_tool_call_reply

__all__ = [
    "Example",
    "ROLES",
    "SHAREGPT_ROLES",
    "optional_text",
    "parse_desirable",
    "parse_label",
    "parse_messages",
    "parse_prompt",
    "parse_reply",
    "parse_transcript",
    "required_text",
    "same_prompt",
    "check_turn_order",
    "user_turn",
]

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {**ROLES, "human": "user", "gpt": "assistant", "chatgpt": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Example:
    """A parsed row: a conversation whose last message is the (chosen) reply when there is one.

    Attributes:
        messages: Normalised messages; for preference data, the prompt followed by the chosen reply.
        rejected: The rejected reply, for preference formats.
        field: Field to name in errors about the conversation as a whole.
        extras: Per-example fields to keep in ``prompts`` records (e.g. a seed task instance's output).
        text: Plain text of a language-modeling row (format ``text``): no conversation, every token trained.
    """

    messages: list[dict]
    rejected: str | None = None
    field: str = ""
    extras: dict = dataclasses.field(default_factory=dict)
    text: str | None = None


def _text(value: object, where: str, empty_reason: str) -> str:
    if value is None:
        raise RecordError(where, "missing (or null); expected a non-empty string", "missing field")
    if not isinstance(value, str):
        raise RecordError(where, f"expected a string, found {describe_value(value)}", "wrong type")
    text = value.strip()
    if not text:
        raise RecordError(where, "is empty; expected a non-empty string", empty_reason)
    return text


def required_text(data: dict, key: str, *, where: str | None = None, empty_reason: str = "empty field") -> str:
    """The stripped, non-empty string ``data[key]``; ``where`` names the field in errors (default ``key``)."""
    return _text(data.get(key), where or key, empty_reason)


def optional_text(data: dict, key: str, *, where: str | None = None) -> str:
    """The stripped string ``data[key]``, or ``""`` when it is absent, null or empty."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(where or key, f"expected a string, found {describe_value(value)}", "wrong type")
    return value.strip()


def user_turn(instruction: str, extra: str) -> dict:
    """A user message from an instruction and its optional input/context, separated by a blank line."""
    return {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}


def parse_messages(value: object, where: str, *, sharegpt: bool = False) -> list[dict]:
    """Normalise a list of chat messages to ``[{"role", "content"}]`` with canonical roles.

    Args:
        value: The raw list; messages use ``role``/``content`` or (ShareGPT) ``from``/``value``.
        where: Field name for errors.
        sharegpt: Accept ShareGPT roles (``human``, ``gpt``) and ``from``/``value`` keys.

    Empty system messages are dropped (they carry nothing); empty user/assistant messages are errors. Tool use
    (TRL's format) is kept: an assistant message's ``tool_calls`` (its content may then be empty), and ``tool``
    messages with the tool's result (``name`` and ``tool_call_id`` kept when given).
    """
    if value is None:
        raise RecordError(where, "missing (or null); expected a list of messages", "missing field")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordError(
            where, f"expected a list of {{role, content}} messages, found {describe_value(value)}", "wrong type"
        )
    if not value:
        raise RecordError(where, "is an empty list; expected at least one message", "empty field")
    roles = SHAREGPT_ROLES if sharegpt else ROLES
    messages = []
    for index, message in enumerate(value):
        role_key, content_key = ("from", "value") if sharegpt and "from" in message else ("role", "content")
        role = message.get(role_key)
        if role is None:
            raise RecordError(f"{where}[{index}].{role_key}", "missing; expected the speaker's role", "missing field")
        canonical = roles.get(role.lower()) if isinstance(role, str) else None
        if canonical is None:
            raise RecordError(
                f"{where}[{index}].{role_key}",
                f"unknown role {role!r}; expected one of {', '.join(roles)}",
                "unknown role",
            )
        content = message.get(content_key)
        if canonical == "system" and isinstance(content, str) and not content.strip():
            continue
        at = f"{where}[{index}]"
        if message.get("tool_calls") not in (None, []):  # Parquet/hub rows give every message the column
            if canonical != "assistant":
                raise RecordError(
                    f"{at}.tool_calls", f"a '{canonical}' message cannot make tool calls", "invalid tool call"
                )
            calls = parse_tool_call_entries(message["tool_calls"], f"{at}.tool_calls")
            text = optional_text(message, content_key, where=f"{at}.{content_key}")
            messages.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif canonical == "tool":
            messages.append(_tool_result(message, content_key, at))
        else:
            reason = "empty response" if canonical == "assistant" else "empty field"
            messages.append({"role": canonical, "content": _text(content, f"{at}.{content_key}", reason)})
    if not messages:
        raise RecordError(where, "has only empty system messages", "empty field")
    return messages


def _tool_result(message: dict, content_key: str, at: str) -> dict:
    """A ``tool`` message: its result text (an empty result is a result) and the optional name and call id."""
    content = message.get(content_key)
    if not isinstance(content, str):
        found = "missing (or null)" if content is None else f"found {describe_value(content)}"
        raise RecordError(
            f"{at}.{content_key}",
            f"{found}; expected the tool's result as a string (JSON text for structured results)",
            "wrong type",
        )
    result = {"role": "tool", "content": content.strip()}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise RecordError(
                    f"{at}.{key}", f"expected a string, found {describe_value(message[key])}", "wrong type"
                )
            result[key] = message[key]
    return result


def parse_prompt(data: dict, key: str) -> list[dict]:
    """A prompt given as a string (one user turn), an HH-style transcript string or a list of messages.

    Transcript prompts (``"\\n\\nHuman: ...\\n\\nAssistant:"``, as in several HH-RLHF derivatives) become their
    turns, without the trailing empty ``Assistant:`` that only cues the reply.
    """
    value = data.get(key)
    if isinstance(value, list):
        return parse_messages(value, key)
    text = _text(value, key, "empty field")
    if text.startswith("Human:") and "\n\nAssistant:" in text:
        return _transcript_turns(text, key, reply_required=False)
    return [{"role": "user", "content": text}]


def parse_reply(data: dict, key: str) -> tuple[list[dict], str]:
    """A reply given as a string or as messages ending in the assistant's reply.

    Returns:
        The messages before the final assistant turn (empty for a plain string) and the reply text.
    """
    value = data.get(key)
    if not isinstance(value, list):
        return [], _text(value, key, "empty response")
    messages = parse_messages(value, key)
    refuse_tool_call_reply(messages[-1], key)
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            key,
            f"expected the conversation to end with the assistant's reply, found a final "
            f"'{messages[-1]['role']}' message",
            "no assistant turn",
        )
    return messages[:-1], messages[-1]["content"]


def parse_transcript(data: dict, key: str) -> list[dict]:
    """Parse an HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into messages.

    The last turn must be the Assistant's; its text (stripped) is the reply.
    """
    return _transcript_turns(_text(data.get(key), key, "empty field"), key, reply_required=True)


def _transcript_turns(text: str, key: str, *, reply_required: bool) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + text)
    if len(parts) == 1 or parts[0].strip():
        found = describe_value(text, 50)
        raise RecordError(
            key,
            "transcript does not parse: expected turns starting with '\\n\\nHuman:' and "
            f"'\\n\\nAssistant:', found {found}",
            "unparseable transcript",
        )
    speakers, texts = parts[1::2], parts[2::2]
    if not reply_required:
        if speakers[-1] == "Assistant" and not texts[-1].strip():
            speakers, texts = speakers[:-1], texts[:-1]  # the empty cue for the reply to come
    elif "Assistant" not in speakers:
        raise RecordError(key, "transcript does not parse: it has no '\\n\\nAssistant:' turn", "unparseable transcript")
    elif speakers[-1] != "Assistant":
        raise RecordError(
            key,
            "transcript ends with a Human turn; expected it to end with the Assistant's reply",
            "unparseable transcript",
        )
    messages = []
    for turn, (speaker, content) in enumerate(zip(speakers, texts), start=1):
        last = turn == len(speakers) and reply_required
        if not content.strip():
            what = "the final Assistant reply is empty" if last else f"turn {turn} ({speaker}) is empty"
            raise RecordError(key, what, "empty response" if last else "empty field")
        messages.append({"role": _HH_ROLES[speaker], "content": content.strip()})
    return messages


def same_prompt(prompt: list[dict], expected: list[dict], key: str, other: str) -> None:
    """Raise a ``prompt mismatch`` error naming the first differing turn unless the two prompts are equal."""
    if prompt == expected:
        return
    turn = next((i for i, (a, b) in enumerate(zip(prompt, expected)) if a != b), min(len(prompt), len(expected)))
    raise RecordError(
        key,
        f"its prompt (everything before the last assistant turn) differs from '{other}' at turn "
        f"{turn + 1} ({len(prompt)} vs {len(expected)} turns); both must share the same prompt",
        "prompt mismatch",
    )


def parse_label(data: dict, key: str) -> int:
    """A 0/1 label (int, bool-free) given as a number or a string such as ``"1"`` (CSV)."""
    value = data.get(key)
    if value is None:
        raise RecordError(key, "missing; expected 0 or 1 (index of the correct solution)", "missing field")
    label = value.strip() if isinstance(value, str) else value
    if label in (0, 1, "0", "1") and not isinstance(label, bool | float):
        return int(label)
    raise RecordError(key, f"expected 0 or 1, found {describe_value(value)}", "invalid label")


def parse_desirable(data: dict, key: str) -> bool:
    """A JSON boolean: ``true`` marks a desirable completion, ``false`` an undesirable one (unpaired feedback).

    Nothing else is read as a boolean: ``0``/``1`` or ``"false"`` could be a score or a class index, and reading
    one the wrong way round would train on the undesirable completions.
    """
    value = data.get(key)
    if value is None:
        raise RecordError(key, "missing; expected true (desirable completion) or false (undesirable)", "missing field")
    if not isinstance(value, bool):
        raise RecordError(
            key,
            f"expected a JSON boolean true or false, found {describe_value(value)}; write the "
            "label as true/false (not 0/1 or a string)",
            "invalid label",
        )
    return value


def check_turn_order(messages: list[dict], where: str) -> None:
    """Refuse conversations whose turns do not alternate user/assistant after any system messages.

    An assistant turn first has no prompt to answer (many chat templates index ``messages[0]`` as the user's and
    fail with a bare template error); two user or two assistant turns in a row are rendered by some templates and
    refused by others (Mistral, Gemma). They are refused here, as invalid rows with the file and line, so
    ``skip_invalid`` can drop them, rather than silently merged: joining the turns would change what is trained.

    Tool use follows OpenAI's order: an assistant turn with ``tool_calls`` is followed by one or more ``tool`` turns
    (or ends the conversation: a row may teach the call alone), and tool turns by the assistant's next turn. A tool
    turn whose ``tool_call_id`` names no call of the turn before it is refused: its result would answer nothing.
    """
    turns = [(index, m) for index, m in enumerate(messages) if m["role"] != "system"]
    if turns and turns[0][1]["role"] == "assistant":
        raise RecordError(
            where,
            "the conversation starts with an assistant turn (after any system message); a reply "
            "needs a user turn before it to answer",
            "assistant turn first",
        )
    call_ids: set[str] = set()
    for position, (index, message) in enumerate(turns):
        role, previous = message["role"], turns[position - 1][1] if position else None
        if role == "tool":
            calls = previous is not None and (previous["role"] == "tool" or previous.get("tool_calls"))
            if not calls:
                raise RecordError(
                    where,
                    f"turn {index + 1} is a 'tool' result (counting from 1, system included) without an assistant "
                    "turn with tool_calls (or another tool result) right before it: nothing called the tool",
                    "tool result without a call",
                )
            if previous.get("tool_calls"):
                call_ids = {c["id"] for c in previous["tool_calls"] if c.get("id")}
            if call_ids and message.get("tool_call_id") and message["tool_call_id"] not in call_ids:
                raise RecordError(
                    where,
                    f"turn {index + 1} answers tool_call_id {message['tool_call_id']!r}, which no call of the "
                    f"assistant turn before it has (its ids: {', '.join(sorted(call_ids))})",
                    "tool result without a call",
                )
        elif previous is not None and previous.get("tool_calls"):
            raise RecordError(
                where,
                f"turn {index + 1} is '{role}' right after an assistant turn with tool_calls (counting from 1, "
                "system included); the calls' results come first, as 'tool' turns",
                "tool call without a result",
            )
        elif previous is not None and previous["role"] == "tool" and role != "assistant":
            raise RecordError(
                where,
                f"turn {index + 1} is '{role}' right after a tool result (counting from 1, system included); "
                "the assistant answers tool results",
                "tool result without an answer",
            )
        elif previous is not None and role == previous["role"]:
            raise RecordError(
                where,
                f"turns {turns[position - 1][0] + 1} and {index + 1} are both '{role}' (counting from 1, system "
                "included); user and assistant turns must alternate: merge consecutive turns of one "
                "speaker into one message",
                "consecutive same-role turns",
            )
