"""Data kinds: what a method trains on (its ``data_kind``), one registry entry each.

A kind says how a parsed row becomes its canonical record, how a record is tokenised, when an encoded example is
unusable and how examples are collated into a batch. :mod:`rlft.data.formats`, :class:`rlft.data.collate.Collator`
and :class:`rlft.data.PreferenceDataModule` look the kind up here instead of branching on its name, so a new kind
is one entry in :data:`DATA_KINDS`.

Canonical records:

* ``sft``: ``{"messages": [{"role", "content"}, ...], "tools"?: [JSON schemas]}`` — trained on the assistant turns
  (their ``tool_calls`` included; ``tool`` results are prompt); or ``{"text": str}`` from plain text rows
  (:mod:`rlft.data.text_rows`) — no chat template, every token trained;
* ``pairs``: ``{"prompt": [messages...], "chosen": str, "rejected": str, **own fields}``;
* ``prompts``: ``{"prompt": [messages...], **other fields of the row}`` (kept for reward functions);
* ``unpaired``: ``{"prompt": [messages...], "completion": str, "label": bool, **own fields}`` — KTO's unpaired
  feedback: ``label`` true for a desirable completion, false for an undesirable one;
* ``rankings``: read and collated by :class:`rlft.data.ranking.RankingDataModule` (only its check lives here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlft.data.batches import Batch, PairBatch, PromptBatch, SFTBatch, Tokens, UnpairedBatch
from rlft.data.encoding import encode_completion, encode_pair, encode_prompt, encode_sft, encode_text
from rlft.data.errors import DataError, RecordError
from rlft.data.fields import Example
from rlft.data.padding import fit, pack, pad, row_fields
from rlft.data.tool_messages import parse_tools, refuse_tool_call_reply
from rlft.logprobs import IGNORE_INDEX

__all__ = ["DATA_KINDS", "DataKind", "RESERVED_PAIR_KEYS", "RESERVED_UNPAIRED_KEYS", "data_kind"]

_PAIR_ENCODED = {"prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "truncated", "row"}
_UNPAIRED_ENCODED = {"prompt_ids", "completion_ids", "completion_labels", "truncated", "row"}
_SFT_ENCODED = {"input_ids", "labels", "truncated", "row"}
_PADDED = {"input_ids", "attention_mask", "labels"}
# what an encoded example and its batch hold: a record's own field cannot take one of these names (it would be
# overwritten, silently)
RESERVED_PAIR_KEYS = frozenset(
    _PAIR_ENCODED
    | _PADDED
    | {"position_ids", "seq_lengths", "prompt_lengths"}
    | {f"{side}_{key}" for side in ("chosen", "rejected") for key in _PADDED}
)
RESERVED_UNPAIRED_KEYS = frozenset(
    _UNPAIRED_ENCODED | _PADDED | {f"kl_{key}" for key in _PADDED} | {"prompt_lengths", "label"}
)


@dataclass(frozen=True)
class DataKind:
    """One data kind.

    Attributes:
        name: What a method sets as ``data_kind``.
        project: ``project(example, row, prompt_fields=..., consumed=...) -> record``: a parsed row to the kind's
            canonical record; ``row`` is the raw row, ``prompt_fields`` the fields its format made the prompt from
            and ``consumed`` every field the format read. ``None``: no input format provides the kind.
        encode: ``encode(tokenizer, record, max_length=..., max_prompt_length=...) -> example`` (with a
            ``truncated`` flag).
        unusable: Why an encoded example cannot train (usually: truncation removed what mattered), else ``None``.
        collate: ``collate(examples, pad_id, multiple_of) -> batch`` (the kind's :mod:`rlft.data.batches` type), padded.
        pack: ``pack(examples) -> batch``, padding-free (``None``: the kind is never packed, see ``unpacked_because``).
        advice: Why a format without this kind cannot provide it and what to do instead.
        unpacked_because: Why ``data.packing`` is refused for this kind.
        imitates_completions: Every completion is a target (SFT): unpaired feedback rows, whose undesirable
            completions must not be imitated, are refused for this kind.
    """

    name: str
    project: Callable[..., dict] | None
    encode: Callable[..., dict] | None
    unusable: Callable[[dict], str | None]
    collate: Callable[[list[dict], int, int | None], Batch] | None
    pack: Callable[[list[dict]], Batch] | None = None
    advice: str = ""
    unpacked_because: str = ""
    imitates_completions: bool = False


# ------------------------------------------------------------------------------------------------------ projections
def _kept(row: dict, skip: frozenset[str], reserved: frozenset[str], what: str) -> dict:
    kept = {k: v for k, v in row.items() if k not in skip}
    for key in sorted(kept.keys() & reserved):
        raise RecordError(
            key, f"is a name rlft uses for the tokenised {what}; rename this field", "reserved field name"
        )
    return kept


def _to_sft(example: Example, row: dict, **_) -> dict:
    if example.text is not None:  # a plain text row: the text is the example
        return {"text": example.text}
    if not any(message["role"] == "assistant" for message in example.messages):
        raise RecordError(
            example.field, "conversation has no assistant turn; SFT trains on assistant replies", "no assistant turn"
        )
    tools = parse_tools(row.get("tools"))  # TRL's row-level tool schemas, shown to the model when encoded
    return {"messages": example.messages, **({"tools": tools} if tools else {})}


def _to_pair(example: Example, row: dict, *, consumed: frozenset[str], **_) -> dict:
    chosen = example.messages[-1]["content"]
    if chosen == example.rejected:
        raise RecordError(
            "rejected",
            "identical to 'chosen' (after stripping whitespace); a pair needs two different responses",
            "identical chosen/rejected",
        )
    # a per-pair margin, weight or score reaches the batch (collate)
    kept = _kept(row, consumed, RESERVED_PAIR_KEYS, "pair")
    return {**kept, "prompt": example.messages[:-1], "chosen": chosen, "rejected": example.rejected}


def _to_prompt(example: Example, row: dict, *, prompt_fields: tuple[str, ...], **_) -> dict:
    messages = example.messages
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if not any(message["role"] == "user" for message in prompt):
        raise RecordError(
            example.field, "no user turn before the final assistant reply; nothing to prompt with", "empty field"
        )
    kept = {k: v for k, v in row.items() if k not in prompt_fields and k != "prompt"}
    return {**kept, **example.extras, "prompt": prompt}


def _to_unpaired(example: Example, row: dict, *, consumed: frozenset[str], **_) -> dict:
    refuse_tool_call_reply(example.messages[-1], example.field or "completion")
    kept = _kept(row, consumed | {"label"}, RESERVED_UNPAIRED_KEYS, "example")
    return {
        **kept,
        "prompt": example.messages[:-1],
        "completion": example.messages[-1]["content"],
        "label": example.extras["label"],
    }


# --------------------------------------------------------------------------------------------------------- encoding
def _encode_sft(tokenizer, record: dict, *, max_length: int, **_) -> dict:
    if "text" in record:
        enc = encode_text(tokenizer, record["text"], max_length=max_length)
    else:
        enc = encode_sft(tokenizer, record["messages"], max_length=max_length, tools=record.get("tools"))
    return {"input_ids": enc.input_ids, "labels": enc.labels, "truncated": enc.truncated}


def _encode_pair(tokenizer, record: dict, *, max_length: int, **_) -> dict:
    extras = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    encoded = encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"], max_length=max_length)
    return {**extras, **encoded}


def _encode_prompt(tokenizer, record: dict, *, max_prompt_length: int, **_) -> dict:
    enc = encode_prompt(tokenizer, record["prompt"], max_length=max_prompt_length)
    return {**record, "prompt_ids": enc.input_ids, "truncated": enc.truncated}


def _encode_unpaired(tokenizer, record: dict, *, max_length: int, **_) -> dict:
    extras = {k: v for k, v in record.items() if k not in ("prompt", "completion")}  # label and own fields
    return {**extras, **encode_completion(tokenizer, record["prompt"], record["completion"], max_length=max_length)}


# ------------------------------------------------------------------------------------------------------- usability
def _sft_unusable(example: dict) -> str | None:
    if all(label == IGNORE_INDEX for label in example["labels"]):
        return "with no trained tokens left after truncation"
    return None


def _pair_unusable(example: dict) -> str | None:
    if example["chosen_ids"] == example["rejected_ids"]:
        return "with chosen == rejected after truncation"
    if not any(t != IGNORE_INDEX for side in ("chosen", "rejected") for t in example[f"{side}_labels"]):
        return "with no reply tokens left after truncation"
    return None


def _prompt_unusable(example: dict) -> str | None:
    return None if example["prompt_ids"] else "with an empty prompt after truncation"


def _unpaired_unusable(example: dict) -> str | None:
    if all(label == IGNORE_INDEX for label in example["completion_labels"]):
        return "with no completion tokens left after truncation"
    return None


# -------------------------------------------------------------------------------------------------------- collation
def _padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int, width: int) -> Tokens:
    return Tokens(
        input_ids=fit(pad(seqs, pad_id), width, pad_id),
        labels=fit(pad(labels, IGNORE_INDEX), width, IGNORE_INDEX),
        attention_mask=fit(pad([[1] * len(s) for s in seqs], 0), width, 0),
    )


def _width(seqs: list[list[int]], multiple_of: int | None) -> int:
    width = max((len(s) for s in seqs), default=0)
    return -(-width // multiple_of) * multiple_of if multiple_of else width


def _collate_sft(examples: list[dict], pad_id: int, multiple_of: int | None) -> SFTBatch:
    ids = [e["input_ids"] for e in examples]
    tokens = _padded(ids, [e["labels"] for e in examples], pad_id, _width(ids, multiple_of))
    return SFTBatch(tokens, fields=row_fields(examples, _SFT_ENCODED))


def _pack_sft(examples: list[dict]) -> SFTBatch:
    tokens = pack([e["input_ids"] for e in examples], [e["labels"] for e in examples])
    return SFTBatch(tokens, fields=row_fields(examples, _SFT_ENCODED))


def _pair_rows(examples: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    # all chosen sequences, then all rejected ones: the order of the concatenated forward
    sides = ("chosen", "rejected")
    seqs = [e["prompt_ids"] + e[f"{side}_ids"] for side in sides for e in examples]
    labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_labels"] for side in sides for e in examples]
    return seqs, labels


def _collate_pairs(examples: list[dict], pad_id: int, multiple_of: int | None) -> PairBatch:
    # chosen and rejected share one width so methods can run them as a single concatenated forward
    seqs, labels = _pair_rows(examples)
    prompt_lengths = torch.tensor([len(e["prompt_ids"]) for e in examples])
    tokens = _padded(seqs, labels, pad_id, _width(seqs, multiple_of))
    return PairBatch(tokens, prompt_lengths, fields=row_fields(examples, _PAIR_ENCODED))


def _pack_pairs(examples: list[dict]) -> PairBatch:
    prompt_lengths = torch.tensor([len(e["prompt_ids"]) for e in examples])
    return PairBatch(pack(*_pair_rows(examples)), prompt_lengths, fields=row_fields(examples, _PAIR_ENCODED))


def _collate_prompts(examples: list[dict], pad_id: int, multiple_of: int | None) -> PromptBatch:
    # left padding: generation appends to the right of every prompt at once
    ids = [e["prompt_ids"] for e in examples]
    # rows of one file may carry different extra fields: every field is kept (as given, for reward functions),
    # None where a row lacks it
    keys = dict.fromkeys(k for e in examples for k in e if k not in ("prompt_ids", "row", "prompt"))
    return PromptBatch(
        pad(ids, pad_id, left=True),
        pad([[1] * len(s) for s in ids], 0, left=True),
        [e.get("prompt") for e in examples],
        fields={key: [e.get(key) for e in examples] for key in keys},
    )


def _mismatched(examples: list[dict], width: int) -> tuple[list[list[int]], list[list[int]]]:
    """KTO's KL pairs: each prompt with the previous row's completion (TRL's shift by one), cut to ``width``.

    Cutting keeps the mismatched rows as wide as the batch, so they cost no more than the batch itself; the
    completion keeps its start and the prompt its end (what the completion follows), at least one token each.
    """
    seqs, labels = [], []
    for i, example in enumerate(examples):
        other = examples[i - 1]  # i = 0 takes the last row's completion
        completion = other["completion_ids"][: max(width - 1, 1)]
        completion_labels = other["completion_labels"][: len(completion)]
        prompt = example["prompt_ids"][-max(width - len(completion), 1) :]
        seqs.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion_labels)
    return seqs, labels


def _collate_unpaired(examples: list[dict], pad_id: int, multiple_of: int | None) -> UnpairedBatch:
    seqs = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e["completion_labels"] for e in examples]
    kl_seqs, kl_labels = _mismatched(examples, max(len(s) for s in seqs))
    width = _width(seqs + kl_seqs, multiple_of)
    return UnpairedBatch(
        _padded(seqs, labels, pad_id, width),
        _padded(kl_seqs, kl_labels, pad_id, width),
        torch.tensor([len(e["prompt_ids"]) for e in examples]),
        torch.tensor([e["label"] for e in examples], dtype=torch.bool),
        fields=row_fields(examples, _UNPAIRED_ENCODED | {"label"}),
    )


# ---------------------------------------------------------------------------------------------------------- registry
DATA_KINDS: dict[str, DataKind] = {
    kind.name: kind
    for kind in (
        DataKind(
            "sft",
            _to_sft,
            _encode_sft,
            _sft_unusable,
            _collate_sft,
            _pack_sft,
            advice="it has prompts but no responses to train on; add a 'completion' field or use it for online "
            "RL (PPO/GRPO, kind 'prompts')",
            imitates_completions=True,
        ),
        DataKind(
            "pairs",
            _to_pair,
            _encode_pair,
            _pair_unusable,
            _collate_pairs,
            _pack_pairs,
            advice="it has no rejected responses, and pairs (DPO, ORPO, SimPO, reward models) need them; use a "
            "preference format (prompt/chosen/rejected, HH-RLHF, PIQA) or train SFT on this data",
        ),
        DataKind(
            "prompts",
            _to_prompt,
            _encode_prompt,
            _prompt_unusable,
            _collate_prompts,
            advice="it has no prompts",
            unpacked_because="online RL generates from left-padded prompt batches",
        ),
        DataKind(
            "unpaired",
            _to_unpaired,
            _encode_unpaired,
            _unpaired_unusable,
            _collate_unpaired,
            advice="it has no desirable/undesirable labels, and unpaired feedback (KTO) needs rows "
            "{prompt, completion, label: true|false}",
            unpacked_because="KTO's KL estimate pairs each prompt with another row's completion in padded rows",
        ),
        DataKind(
            "rankings",
            None,
            None,
            _prompt_unusable,
            None,
            advice="rankings are read by RankingDataModule",
            unpacked_because="RankingDataModule does not pack",
        ),
    )
}


def data_kind(name: str) -> DataKind:
    """The registered kind ``name``; raises :class:`DataError` naming the known kinds otherwise."""
    if name not in DATA_KINDS:
        raise DataError(f"unknown record kind '{name}'; expected one of {', '.join(DATA_KINDS)}")
    return DATA_KINDS[name]
