"""Parsing ranked rows (``{"prompt", "responses": [best, ..., worst]}`` or with ``"scores"``); see
:mod:`rlft.data.ranking` for the format and the two ways to train on it."""

from __future__ import annotations

import math

from rlft.data.errors import RecordError, describe_value
from rlft.data.fields import Example, parse_prompt


def parse_ranking(data: dict) -> tuple[list[dict], list[str]]:
    """``(prompt messages, responses best first)`` of one ranked row; raises :class:`RecordError` naming the field."""
    prompt = parse_prompt(data, "prompt")
    responses = data.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise RecordError(
            "responses", f"expected a list of reply strings, found {describe_value(responses)}", "wrong type"
        )
    responses = [r.strip() for r in responses]
    if len(responses) < 2:
        raise RecordError("responses", f"a ranking needs at least 2 responses, found {len(responses)}", "too few")
    for index, response in enumerate(responses):
        if not response:
            raise RecordError(f"responses[{index}]", "is empty; expected a reply", "empty response")
    if len(set(responses)) != len(responses):
        raise RecordError(
            "responses", "contains the same reply twice; a ranking orders different replies", "duplicate response"
        )
    scores = data.get("scores")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != len(responses):
            raise RecordError(
                "scores",
                f"expected {len(responses)} numbers (one per response), found {describe_value(scores)}",
                "wrong type",
            )
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise RecordError("scores", "every score must be a finite number", "wrong type")
        order = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable: ties keep their order
        responses = [responses[i] for i in order]
    return prompt, responses


def from_ranked(data: dict, kind: str) -> list[Example]:
    """Input-format parser: pairs -> every (better, worse) pair; sft -> the best reply; prompts -> the prompt."""
    prompt, responses = parse_ranking(data)
    if kind == "pairs":
        return [
            Example([*prompt, {"role": "assistant", "content": better}], rejected=worse, field="responses")
            for i, better in enumerate(responses)
            for worse in responses[i + 1 :]
        ]
    return [Example([*prompt, {"role": "assistant", "content": responses[0]}], field="responses")]
