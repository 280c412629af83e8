"""Row parsers: one input row (a dict) to :class:`rlft.data.fields.Example` objects, one parser per input format.

Each parser takes ``(row, kind)`` and raises :class:`rlft.data.errors.RecordError` naming the field on bad input;
:mod:`rlft.data.formats` registers them with their detection rules.
"""

from __future__ import annotations

from collections.abc import Callable

from rlft.data.errors import RecordError
from rlft.data.fields import (
    Example,
    optional_text,
    parse_label,
    parse_messages,
    parse_prompt,
    parse_reply,
    parse_transcript,
    required_text,
    same_prompt,
    user_turn,
)


def from_messages(data: dict, kind: str) -> list[Example]:
    return [Example(parse_messages(data.get("messages"), "messages"), field="messages")]


def from_sharegpt(data: dict, kind: str) -> list[Example]:
    messages = parse_messages(data.get("conversations"), "conversations", sharegpt=True)
    system = optional_text(data, "system")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return [Example(messages, field="conversations")]


def from_prompt_completion(data: dict, kind: str) -> list[Example]:
    prompt = parse_prompt(data, "prompt")
    completion = data.get("completion")
    if isinstance(completion, list):
        turns = parse_messages(completion, "completion")
        if turns[-1]["role"] != "assistant":
            raise RecordError("completion", "the completion must end with an assistant message", "no assistant turn")
    else:
        turns = [{"role": "assistant", "content": required_text(data, "completion", empty_reason="empty response")}]
    return [Example(prompt + turns, field="completion")]


def from_prompt_only(data: dict, kind: str) -> list[Example]:
    key = "prompt" if data.get("prompt") is not None else "question"
    return [Example(parse_prompt(data, key), field=key)]


def from_instruction(extra_key: str, reply_key: str) -> Callable[[dict, str], list[Example]]:
    def parse(data: dict, kind: str) -> list[Example]:
        prompt = user_turn(required_text(data, "instruction"), optional_text(data, extra_key))
        reply = required_text(data, reply_key, empty_reason="empty response")
        return [Example([prompt, {"role": "assistant", "content": reply}], field=reply_key)]

    return parse


def from_alpaca_seed(data: dict, kind: str) -> list[Example]:
    instruction = required_text(data, "instruction")
    instances = data.get("instances")
    if instances is None:
        raise RecordError("instances", "missing; expected a list of {input, output} objects", "missing field")
    if not isinstance(instances, list):
        raise RecordError(
            "instances", f"expected a list of {{input, output}}, found {type(instances).__name__}", "wrong type"
        )
    if not instances:
        raise RecordError("instances", "empty list; a seed task needs at least one {input, output}", "empty instances")
    examples = []
    for index, instance in enumerate(instances):
        where = f"instances[{index}]"
        if not isinstance(instance, dict):
            raise RecordError(where, f"expected an object, found {type(instance).__name__}", "wrong type")
        prompt = user_turn(instruction, optional_text(instance, "input", where=f"{where}.input"))
        output = required_text(instance, "output", where=f"{where}.output", empty_reason="empty response")
        examples.append(
            Example([prompt, {"role": "assistant", "content": output}], field=where, extras={"output": output})
        )
    return examples


def from_hh(data: dict, kind: str) -> list[Example]:
    chosen = parse_transcript(data, "chosen")
    rejected = parse_transcript(data, "rejected")
    same_prompt(chosen[:-1], rejected[:-1], "rejected", "chosen")
    return [Example(chosen, rejected=rejected[-1]["content"], field="chosen")]


def from_preference(data: dict, kind: str) -> list[Example]:
    chosen_prefix, chosen = parse_reply(data, "chosen")
    rejected_prefix, rejected = parse_reply(data, "rejected")
    if data.get("prompt") is not None:
        prompt = parse_prompt(data, "prompt")
        for prefix, key in ((chosen_prefix, "chosen"), (rejected_prefix, "rejected")):
            if prefix:
                same_prompt(prefix, prompt, key, "prompt")
    else:  # implicit prompt: chosen and rejected are full conversations sharing it
        if not chosen_prefix:
            raise RecordError(
                "prompt", "missing; give a prompt or full conversations in chosen/rejected", "missing field"
            )
        prompt = chosen_prefix
        if rejected_prefix:  # a bare rejected reply (string or one message) shares chosen's prompt by definition
            same_prompt(rejected_prefix, prompt, "rejected", "chosen")
    return [Example([*prompt, {"role": "assistant", "content": chosen}], rejected=rejected, field="chosen")]


def from_piqa(data: dict, kind: str) -> list[Example]:
    goal = user_turn(required_text(data, "goal"), "")
    solutions = [
        required_text(data, "sol1", empty_reason="empty response"),
        required_text(data, "sol2", empty_reason="empty response"),
    ]
    if kind == "prompts" and data.get("label") in (None, -1, "-1"):  # the PIQA test split is unlabelled
        return [Example([goal], field="goal")]
    label = parse_label(data, "label")
    reply = {"role": "assistant", "content": solutions[label]}
    return [Example([goal, reply], rejected=solutions[1 - label], field="label")]
