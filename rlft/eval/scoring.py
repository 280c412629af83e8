"""Log-likelihood scoring of token sequences: the shared core of perplexity and multiple-choice accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlft.models.modes import inference as eval_mode  # no grad, eval mode, restored after
from rlft.models.scoring import scored_logps


@dataclass(frozen=True)
class ScoringWindow:
    """One forward pass: ``input_ids`` and the positions (indices into ``input_ids``) whose tokens are scored.

    A token at position ``p`` is predicted by the logits at ``p - 1``, so every target position must be >= 1.
    """

    input_ids: list[int]
    targets: list[int]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_windows(
    model: torch.nn.Module, windows: Sequence[ScoringWindow], *, batch_size: int = 8
) -> list[list[float]]:
    """Log-probabilities of each window's target tokens, in window order.

    Windows are sorted by length and right-padded into batches; padding never influences real tokens because the
    model is causal and padded positions are masked out of attention.
    """
    for w in windows:
        if any(p < 1 or p >= len(w.input_ids) for p in w.targets):
            raise ValueError("target positions must lie in [1, len(input_ids))")
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
    results: list[list[float]] = [[] for _ in windows]
    device = _device(model)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = [windows[i] for i in order[start : start + batch_size]]
            width = max(len(w.input_ids) for w in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
                mask[row, : len(w.input_ids)] = 1
            # the LM head runs only where a target is predicted, chunk by chunk (the scorer training uses): no
            # [B, T, V] fp32 logits, whatever the vocabulary
            rows = torch.cat([torch.full((len(w.targets),), row) for row, w in enumerate(batch)])
            positions = torch.cat([torch.tensor(w.targets, dtype=torch.long) for w in batch])
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            source, targets = (rows * width + positions - 1).to(device), ids[rows, positions].to(device)
            logps = scored_logps(model, inputs, source, targets)
            for row, piece in enumerate(logps.float().split([len(w.targets) for w in batch])):
                results[order[start + row]] = piece.tolist()
    return results


def sliding_windows(
    input_ids: Sequence[int], scored: Sequence[bool], *, max_length: int, stride: int
) -> list[ScoringWindow]:
    """Split one long sequence into windows that score every ``scored`` token exactly once.

    Targets are taken in chunks of ``stride`` tokens; each chunk is scored in a window that ends with it and starts
    up to ``max_length`` tokens earlier, so every token sees at least ``max_length - stride`` tokens of context.
    A sequence that fits in ``max_length`` is one window (exactly the unwindowed computation).

    Args:
        input_ids: The full token sequence.
        scored: Per position, whether its token counts (position 0 can never be scored: nothing predicts it).
        max_length: Longest window the model can take.
        stride: Targets per window; ``1 <= stride < max_length``.
    """
    if not 1 <= stride < max_length:
        raise ValueError(f"need 1 <= stride < max_length, got stride={stride}, max_length={max_length}")
    n = len(input_ids)
    if n <= max_length:
        targets = [p for p in range(1, n) if scored[p]]
        return [ScoringWindow(list(input_ids), targets)] if targets else []
    windows = []
    for target_start in range(1, n, stride):
        target_end = min(target_start + stride, n)
        begin = max(0, target_end - max_length)
        targets = [p - begin for p in range(target_start, target_end) if scored[p]]
        if targets:
            windows.append(ScoringWindow(list(input_ids[begin:target_end]), targets))
    return windows


def continuation_logprob(
    model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8
) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` per (context, continuation).

    The pair is encoded as one string so the tokenizer merges across the boundary the way it would in real text;
    the continuation's tokens are those after the context's own encoding (lm-eval's convention). Whitespace that
    ends the context is moved to the start of the continuation for the same reason.
    """
    windows = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        prefix = tokenizer(stripped, add_special_tokens=True)["input_ids"]
        whole = tokenizer(stripped + continuation, add_special_tokens=True)["input_ids"]
        if whole[: len(prefix)] != prefix:  # the merge crossed the boundary: fall back to separate encodings
            whole = prefix + tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not prefix:
            raise ValueError("the context must not be empty: nothing would predict the first continuation token")
        windows.append(ScoringWindow(whole, list(range(len(prefix), len(whole)))))
    scores = score_windows(model, windows, batch_size=batch_size)
    return [(sum(s), len(s)) for s in scores]
