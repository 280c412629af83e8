"""Typed batches, one dataclass per data kind: what a method's ``compute_loss`` and every hook receive.

A batch holds its token blocks (:class:`Tokens`, padded ``[B, T]`` rows or one packed ``[1, N]`` row) and the
data's own per-row ``fields`` (a pair's ``margin``, ``weight`` or ``score``; a prompt's reference answer), so a
method reads ``batch.field("margin")`` instead of probing a dict by key. Lightning moves the tensors of a dataclass
to the device like those of a dict (:func:`lightning.fabric.utilities.apply_func.move_data_to_device`).

Per data kind (:mod:`rlft.data.kinds` builds them):

* ``sft`` → :class:`SFTBatch`; ``pairs`` → :class:`PairBatch` (chosen and rejected as one block of ``2B``
  sequences, chosen first: the concatenated forward every preference method runs); ``unpaired`` →
  :class:`UnpairedBatch`; ``prompts`` → :class:`PromptBatch`; ``rankings`` → :class:`RankingBatch`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["Batch", "PairBatch", "PromptBatch", "RankingBatch", "SFTBatch", "Tokens", "UnpairedBatch"]

FieldValue = torch.Tensor | list


@dataclass
class Tokens:
    """A block of token sequences, padded or packed.

    Attributes:
        input_ids: ``[S, T]`` right-padded rows, or ``[1, N]``: every sequence back to back (packed).
        labels: Same shape; ``-100`` where no token is trained (prompts, padding, a packed sequence's first token).
        attention_mask: ``[S, T]`` for padded rows; ``None`` when packed.
        position_ids: ``[1, N]`` positions restarting at 0 for every packed sequence; ``None`` when padded.
        seq_lengths: ``[S]`` length of each packed sequence; ``None`` when padded.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lengths: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        """Whether the sequences are packed into one row (``seq_lengths`` says where each ends)."""
        return self.seq_lengths is not None

    def __len__(self) -> int:
        """Sequences in the block."""
        return len(self.seq_lengths) if self.packed else self.input_ids.shape[0]

    def real_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(self.seq_lengths.sum() if self.packed else self.attention_mask.sum())

    def sequences(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input_ids, labels)`` of every sequence, in order, without padding."""
        if self.packed:
            lengths = self.seq_lengths.tolist()
            return list(zip(self.input_ids[0].split(lengths), self.labels[0].split(lengths)))
        keep = self.attention_mask.bool()
        return [(ids[k], labels[k]) for ids, labels, k in zip(self.input_ids, self.labels, keep)]


@dataclass
class Batch:
    """What every batch has: the data's per-row fields.

    Attributes:
        fields: Per-row fields of the data beyond what the kind encodes, by name: ``[B]`` float tensors where every
            row holds a number, else lists (``None`` where a row lacks the field).
    """

    fields: dict[str, FieldValue] = dataclasses.field(default_factory=dict, kw_only=True)

    def field(self, name: str) -> torch.Tensor | None:
        """The per-row numeric field ``name`` as ``[B]`` floats, or ``None`` when the data has none.

        Raises:
            ValueError: Some row's value is not a number (the batch holds the field as a list).
        """
        value = self.fields.get(name)
        if value is None or torch.is_tensor(value):
            return value
        raise ValueError(f"per-row field {name!r} must be a number on every row of a batch, got {value[:4]}")

    def __len__(self) -> int:
        """Examples in the batch (a pair, a ranking, a prompt counts once)."""
        raise NotImplementedError

    def __getitem__(self, key):
        # batches were dicts before they were typed: point code written for that at what replaced it
        names = ", ".join(f.name for f in dataclasses.fields(self) if f.name != "fields")
        raise TypeError(
            f"{type(self).__name__} is not a dict: read batch.field({key!r}) (a numeric per-row field) or "
            f"batch.fields[{key!r}] (any per-row field); its data: {names} (see rlft.data.batches)"
        )

    def token_blocks(self) -> list[Tokens]:
        """Every token block of the batch."""
        return [value for value in vars(self).values() if isinstance(value, Tokens)]

    def id_tensors(self) -> list[torch.Tensor]:
        """Every token-id tensor of the batch (what identifies it, e.g. to name its data rows)."""
        return [tokens.input_ids for tokens in self.token_blocks()]

    def real_tokens(self) -> int:
        """Tokens that are not padding, over every block (for throughput)."""
        return sum(tokens.real_tokens() for tokens in self.token_blocks())


@dataclass
class SFTBatch(Batch):
    """``sft`` rows: sequences whose assistant turns (or, for plain text, every token) are trained."""

    tokens: Tokens

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PairBatch(Batch):
    """``pairs`` rows: ``sequences`` holds the ``B`` chosen sequences, then the ``B`` rejected ones.

    Attributes:
        sequences: ``2B`` prompt + response sequences (padded to one width, or packed in that order).
        prompt_lengths: ``[B]`` prompt tokens of each pair.
    """

    sequences: Tokens
    prompt_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def side(self, name: str) -> Tokens:
        """The padded ``chosen`` or ``rejected`` half as its own block (padded batches only)."""
        if self.sequences.packed:
            raise ValueError("a packed pair batch has no padded halves; use batch.sequences.sequences()")
        rows = slice(0, len(self)) if name == "chosen" else slice(len(self), 2 * len(self))
        block = self.sequences
        return Tokens(block.input_ids[rows], block.labels[rows], block.attention_mask[rows])


@dataclass
class UnpairedBatch(Batch):
    """``unpaired`` rows (KTO): one completion per row, desirable or not.

    Attributes:
        tokens: ``[B, T]`` prompt + completion rows.
        kl_tokens: ``[B, T]`` mismatched rows (each prompt with another row's completion) for the KL estimate.
        prompt_lengths: ``[B]`` prompt tokens of each row.
        label: ``[B]`` bool, true for a desirable completion.
    """

    tokens: Tokens
    kl_tokens: Tokens
    prompt_lengths: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class PromptBatch(Batch):
    """``prompts`` rows for online RL: left-padded prompt tokens and each row's other fields (for reward functions).

    Attributes:
        input_ids: ``[B, P]`` left-padded prompt tokens.
        attention_mask: ``[B, P]``.
        prompts: ``B`` prompts as messages (``None`` where unknown).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def id_tensors(self) -> list[torch.Tensor]:
        return [self.input_ids]

    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class RankingBatch(Batch):
    """``rankings`` rows: each prompt with its responses, best first.

    Attributes:
        tokens: ``[sum(sizes), T]`` padded prompt + response rows, ranking by ranking.
        sizes: ``[B]`` responses of each ranking.
    """

    tokens: Tokens
    sizes: torch.Tensor

    def __len__(self) -> int:
        return len(self.sizes)
