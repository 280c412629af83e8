"""Parsing unpaired feedback rows (TRL's KTO format): ``{"prompt", "completion", "label": true | false}``.

``label`` is a JSON boolean: ``true`` for a desirable completion, ``false`` for an undesirable one. The prompt is a
string or a message list; the completion a string or messages ending in the assistant's reply.
"""

from __future__ import annotations

from rlft.data.fields import Example, parse_desirable
from rlft.data.parsers import from_prompt_completion


def from_unpaired(data: dict, kind: str) -> list[Example]:
    """Input-format parser: one example whose ``extras["label"]`` says whether the completion is desirable."""
    (example,) = from_prompt_completion(data, kind)
    example.extras["label"] = parse_desirable(data, "label")
    return [example]
