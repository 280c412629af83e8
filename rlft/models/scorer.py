"""The one protocol for scoring ``(prompt, response)`` exchanges with a reward.

Everything that gives an exchange a number implements it: rlft's trained reward model
(:class:`rlft.models.reward.RewardScorer`, loaded from a folder or wrapped around the network being trained), a
transformers sequence-classification reward model and plain text functions
(:class:`rlft.eval.reward_bench.TextScorer` and its subclasses). RL rewards, ``rlft eval reward-bench``, the
evaluation callbacks and the pipelines call nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ExchangeScorer(Protocol):
    """Scores exchanges: ``score_exchanges(prompts, responses)`` gives one float per ``(prompt, response)``.

    A prompt is a list of chat messages (``[{"role": "user", "content": ...}, ...]``) or a plain user string; the
    response is the assistant reply that is scored.
    """

    def score_exchanges(self, prompts: Sequence[list[dict] | str], responses: Sequence[str]) -> list[float]: ...
