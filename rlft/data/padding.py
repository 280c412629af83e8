"""Padding and packing primitives shared by every data kind's collate function (:mod:`rlft.data.kinds`)."""

from __future__ import annotations

import torch

from rlft.data.batches import Tokens
from rlft.logprobs import IGNORE_INDEX

__all__ = ["fit", "pack", "pad", "row_fields"]


def pad(sequences: list[list[int]], value: int, *, left: bool = False, multiple_of: int | None = None) -> torch.Tensor:
    """Stack ragged lists into a ``[B, T]`` tensor padded with ``value`` on the right (or left)."""
    length = max((len(s) for s in sequences), default=0)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if left:
                out[row, length - len(seq) :] = torch.tensor(seq)
            else:
                out[row, : len(seq)] = torch.tensor(seq)
    return out


def pack(sequences: list[list[int]], labels: list[list[int]]) -> Tokens:
    """Concatenate sequences into one padding-free row ``[1, sum(lengths)]``.

    ``position_ids`` restart at 0 for every sequence; transformers turns that into a block-diagonal causal mask
    (varlen kernels with flash-attention), so no token attends across an example boundary. The first label of
    each sequence is ignored because its "previous token" belongs to another example.
    """
    ids, positions, targets = [], [], []
    for seq, lab in zip(sequences, labels):
        ids += seq
        positions += range(len(seq))
        targets += [IGNORE_INDEX] + lab[1:]
    return Tokens(
        input_ids=torch.tensor([ids]),
        labels=torch.tensor([targets]),
        position_ids=torch.tensor([positions]),
        seq_lengths=torch.tensor([len(s) for s in sequences]),
    )


def fit(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """``tensor`` right-padded with ``value`` to ``width`` columns."""
    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def row_fields(examples: list[dict], skip: frozenset[str] | set[str]) -> dict:
    """The examples' own fields (a margin, a weight, a score) by name: ``[B]`` float tensors when every example has a
    number, else lists (``None`` where an example lacks the field). ``skip`` names the encoded keys."""
    fields = {}
    for key in dict.fromkeys(k for e in examples for k in e if k not in skip):
        values = [e.get(key) for e in examples]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        fields[key] = torch.tensor(values, dtype=torch.float32) if numeric else values
    return fields
