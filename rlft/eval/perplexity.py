"""Token-weighted perplexity over assistant tokens or the full text, with a sliding window for long texts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from rlft.data.encoding import encode_conversation, encode_text
from rlft.eval.scoring import score_windows, sliding_windows
from rlft.logprobs import IGNORE_INDEX


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(total NLL / scored tokens)``: every token weighs the same, whatever example it is in.

    ``mean_example_perplexity`` is the (differently weighted) average of per-example perplexities, for reference.
    """

    perplexity: float
    nll: float
    tokens: int
    examples: int
    mode: str
    mean_example_perplexity: float
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _max_context(model) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, 4096)
    return 2048


def _encode(tokenizer, record: dict, mode: str) -> tuple[list[int], list[bool]]:
    """Token ids and per-token "is scored" flags of one record (``messages`` record or ``{"text": ...}``).

    A text record (a plain text row of a data file, format ``text``) is tokenized as SFT tokenizes it
    (:func:`rlft.data.encoding.encode_text`: no chat template, the tokenizer's own BOS) without the EOS that
    training appends: the perplexity of a text is that of its tokens, as in lm-eval-harness's rolling perplexity.
    """
    if "messages" in record:
        encoded = encode_conversation(tokenizer, record["messages"], tools=record.get("tools"))
        scored = [label != IGNORE_INDEX for label in encoded.labels]
        return encoded.input_ids, scored if mode == "assistant" else [True] * len(encoded.input_ids)
    if "text" in record:  # every token is what SFT trains on a text: both modes score them all
        ids = encode_text(tokenizer, record["text"], eos=False).input_ids
        return ids, [True] * len(ids)
    raise ValueError(f"perplexity needs records with 'messages' (chat data) or 'text', got keys {sorted(record)}")


MODES = ("assistant", "full")


def perplexity(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    mode: str = "assistant",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``records``.

    Args:
        model: Causal LM (adapter or not).
        tokenizer: Its tokenizer (chat template for ``messages`` records).
        records: Canonical SFT records ``{"messages": [...]}`` or ``{"text": str}`` (plain text rows).
        mode: ``"assistant"`` scores only assistant tokens (what SFT trains, end-of-turn included);
            ``"full"`` scores every token after the first (on ``text`` records both modes do: SFT trains them all).
        max_length: Longest window; default the model's context length (at most 4096).
        stride: Tokens scored per window of a long text (default ``max_length // 2``); each scored token then sees
            at least ``max_length - stride`` tokens of context.
        batch_size: Windows per forward pass.

    Raises:
        ValueError: Unknown mode, records without the needed fields, or no token to score.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    max_length = max_length or _max_context(model)
    stride = stride or max(1, max_length // 2)
    windows, owner = [], []
    for index, record in enumerate(records):
        ids, scored = _encode(tokenizer, record, mode)
        for window in sliding_windows(ids, scored, max_length=max_length, stride=stride):
            windows.append(window)
            owner.append(index)
    if not windows:
        raise ValueError(f"no tokens to score in {len(records)} records (mode={mode!r})")
    per_window = score_windows(model, windows, batch_size=batch_size)
    nll_by_example: dict[int, list[float]] = {}
    for index, logps in zip(owner, per_window):
        nll_by_example.setdefault(index, []).extend(-lp for lp in logps)
    total_nll = sum(sum(v) for v in nll_by_example.values())
    total_tokens = sum(len(v) for v in nll_by_example.values())
    example_ppl = [math.exp(sum(v) / len(v)) for v in nll_by_example.values()]
    return PerplexityResult(
        perplexity=math.exp(total_nll / total_tokens),
        nll=total_nll / total_tokens,
        tokens=total_tokens,
        examples=len(nll_by_example),
        mode=mode,
        mean_example_perplexity=sum(example_ppl) / len(example_ppl),
        windows=len(windows),
    )
