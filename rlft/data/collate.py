"""Dynamic padding: each batch is padded to its own longest sequence, never to ``max_length``.

Each data kind's own collate function lives in its registry entry (:mod:`rlft.data.kinds`), building that kind's
typed batch (:mod:`rlft.data.batches`); the primitives live in :mod:`rlft.data.padding` (``pad``, ``pack``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from rlft.data.batches import Batch
from rlft.data.kinds import data_kind


class Collator:
    """Builds batches for one data kind (``sft``, ``pairs``, ``prompts``, ``unpaired``), padded or packed."""

    def __init__(
        self, kind: str, pad_token_id: int, pad_to_multiple_of: int | None = None, packing: bool = False
    ) -> None:
        self.kind = kind
        self.spec = data_kind(kind)
        if self.spec.collate is None:
            raise ValueError(f"'{kind}' batches are not built by Collator ({self.spec.advice})")
        self.pad_id = pad_token_id
        self.multiple_of = pad_to_multiple_of
        self.packing = packing
        # fingerprint -> data rows of recently built batches, so a callback can name the rows of a bad batch
        # (the loader builds batches ahead of training, so "the last batch built" is not the one being trained)
        self.recent_rows: OrderedDict[str, list[str]] = OrderedDict()

    def __call__(self, examples: list[dict]) -> Batch:
        kind = self.spec
        if self.packing and kind.pack is not None:
            batch = kind.pack(examples)
        else:
            batch = kind.collate(examples, self.pad_id, self.multiple_of)
        if any("row" in e for e in examples):
            self.recent_rows[batch_fingerprint(batch)] = [e.get("row", "?") for e in examples]
            while len(self.recent_rows) > 16:
                self.recent_rows.popitem(last=False)
        return batch


def batch_fingerprint(batch: Batch) -> str:
    """A short hash of a batch's token ids (the same batch gives the same value after moving to a device)."""
    digest = hashlib.blake2b(digest_size=12)
    for ids in batch.id_tensors():
        digest.update(ids.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_tokens(batch: Batch) -> int:
    """Real (non-pad) tokens in a padded or packed batch, for throughput."""
    return batch.real_tokens()
