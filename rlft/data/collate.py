"""Dynamic padding: each batch is padded to its own longest sequence, never to ``max_length``."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from rlft.data.encoding import IGNORE_INDEX


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


def pack(sequences: list[list[int]], labels: list[list[int]]) -> dict:
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
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([targets]),
        "seq_lengths": torch.tensor([len(s) for s in sequences]),
    }


class Collator:
    """Builds batches for one data kind (``sft``, ``pairs`` or ``prompts``), padded or packed."""

    def __init__(
        self, kind: str, pad_token_id: int, pad_to_multiple_of: int | None = None, packing: bool = False
    ) -> None:
        self.kind = kind
        self.pad_id = pad_token_id
        self.multiple_of = pad_to_multiple_of
        self.packing = packing
        # fingerprint -> data rows of recently built batches, so a callback can name the rows of a bad batch
        # (the loader builds batches ahead of training, so "the last batch built" is not the one being trained)
        self.recent_rows: OrderedDict[str, list[str]] = OrderedDict()

    def __call__(self, examples: list[dict]) -> dict:
        if self.packing and self.kind == "sft":
            batch = pack([e["input_ids"] for e in examples], [e["labels"] for e in examples])
        elif self.packing and self.kind == "pairs":
            batch = self._pairs_packed(examples)
        else:
            batch = getattr(self, f"_{self.kind}")(examples)
        if any("row" in e for e in examples):
            self.recent_rows[batch_fingerprint(batch)] = [e.get("row", "?") for e in examples]
            while len(self.recent_rows) > 16:
                self.recent_rows.popitem(last=False)
        return batch

    def _pairs_packed(self, examples: list[dict]) -> dict:
        # all chosen sequences, then all rejected ones: the same order as the padded concatenated forward
        sides = ("chosen", "rejected")
        seqs = [e["prompt_ids"] + e[f"{side}_ids"] for side in sides for e in examples]
        labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_labels"] for side in sides for e in examples]
        batch = pack(seqs, labels)
        batch["prompt_lengths"] = torch.tensor([len(e["prompt_ids"]) for e in examples])
        return _with_pair_fields(batch, examples)

    def _right(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        return pad(seqs, value, multiple_of=self.multiple_of)

    def _sft(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": self._right(ids, self.pad_id),
            "attention_mask": self._right([[1] * len(s) for s in ids], 0),
            "labels": self._right([e["labels"] for e in examples], IGNORE_INDEX),
        }

    def _pairs(self, examples: list[dict]) -> dict:
        # chosen and rejected share one width so methods can run them as a single concatenated forward
        batch: dict = {}
        seqs = {side: [e["prompt_ids"] + e[f"{side}_ids"] for e in examples] for side in ("chosen", "rejected")}
        labels = {
            side: [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_labels"] for e in examples]
            for side in ("chosen", "rejected")
        }
        width = max(len(s) for side in seqs.values() for s in side)
        if self.multiple_of:
            width = -(-width // self.multiple_of) * self.multiple_of
        for side in ("chosen", "rejected"):
            batch[f"{side}_input_ids"] = _fit(self._right(seqs[side], self.pad_id), width, self.pad_id)
            batch[f"{side}_attention_mask"] = _fit(self._right([[1] * len(s) for s in seqs[side]], 0), width, 0)
            batch[f"{side}_labels"] = _fit(self._right(labels[side], IGNORE_INDEX), width, IGNORE_INDEX)
        batch["prompt_lengths"] = torch.tensor([len(e["prompt_ids"]) for e in examples])
        return _with_pair_fields(batch, examples)

    def _prompts(self, examples: list[dict]) -> dict:
        # left padding: generation appends to the right of every prompt at once
        ids = [e["prompt_ids"] for e in examples]
        batch = {
            "prompt_input_ids": pad(ids, self.pad_id, left=True),
            "prompt_attention_mask": pad([[1] * len(s) for s in ids], 0, left=True),
        }
        # rows of one file may carry different extra fields: every field is kept, None where a row lacks it
        keys = dict.fromkeys(k for e in examples for k in e if k not in ("prompt_ids", "row"))
        for key in keys:
            batch[key] = [e.get(key) for e in examples]
        return batch


_PAIR_KEYS = {"prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "truncated", "row"}


def _with_pair_fields(batch: dict, examples: list[dict]) -> dict:
    """The pairs' own fields (a margin, a weight, a score): ``[B]`` float tensors when every pair has a number,
    else lists (``None`` where a pair lacks the field)."""
    keys = dict.fromkeys(k for e in examples for k in e if k not in _PAIR_KEYS and k not in batch)
    for key in keys:
        values = [e.get(key) for e in examples]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        batch[key] = torch.tensor(values, dtype=torch.float32) if numeric else values
    return batch


def _fit(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def batch_fingerprint(batch: dict) -> str:
    """A short hash of a batch's token ids (the same batch gives the same value after moving to a device)."""
    digest = hashlib.blake2b(digest_size=12)
    for key in sorted(batch):
        value = batch[key]
        if torch.is_tensor(value) and key.endswith("input_ids"):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a padded or packed batch, for throughput."""
    if "seq_lengths" in batch:
        return int(batch["seq_lengths"].sum())
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)))
