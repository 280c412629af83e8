"""Ranked responses: K replies to one prompt, best first — InstructGPT's labeling format.

A ranked row is ``{"prompt": str | [messages], "responses": [best, ..., worst]}``, or ``"responses"`` in any order
plus ``"scores"`` (higher is better; ties keep their given order). Two ways to train on it:

* as pairs, through the ``ranked`` input format (all K-choose-2 (better, worse) pairs; any pair method: DPO,
  ORPO, a Bradley-Terry reward model);
* as whole rankings, with :class:`RankingDataModule` and ``RewardModel(ranking_loss=...)``: all K responses of a
  prompt in one forward and a listwise loss (:func:`rlft.ranking_losses.plackett_luce_loss`,
  :func:`rlft.ranking_losses.kwise_bradley_terry_loss`).
"""

from __future__ import annotations

import logging

import torch

from rlft.data.batches import RankingBatch, Tokens
from rlft.data.datamodule import PreferenceDataModule
from rlft.data.encoding import encode_conversation, truncate
from rlft.data.errors import DataError, Issue, RecordError
from rlft.data.padding import pad
from rlft.data.ranked_rows import parse_ranking
from rlft.data.sources import iter_rows
from rlft.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)


class RankingDataModule(PreferenceDataModule):
    """Serves whole rankings for a listwise reward model: a batch holds ``batch_size`` prompts with all their
    responses, as ``ranking_input_ids`` / ``ranking_attention_mask`` (``[sum K, T]``, right-padded, best first per
    prompt) and ``ranking_sizes`` (``[B]``, the K of each prompt).

    Takes the arguments of :class:`PreferenceDataModule` (``format`` must be ``auto`` or ``ranked``; ``packing``
    is not supported). Use with ``RewardModel(ranking_loss=plackett_luce)``.
    """

    def attach(self, kind: str, tokenizer) -> RankingDataModule:
        if kind != "pairs":
            raise DataError(f"RankingDataModule serves rankings to a reward model; this method needs {kind!r} data")
        if self.hparams.packing:
            raise DataError("RankingDataModule does not pack; set data.packing: false")
        if self.hparams.format not in ("auto", "ranked"):
            raise DataError(f"RankingDataModule reads the ranked format, not {self.hparams.format!r}")
        self.kind, self.tokenizer = "rankings", tokenizer
        return self

    def _records(self, path: str, split: str, need: int | None = None) -> list[dict]:
        """Ranked records of ``path``; with ``need`` (from ``data.limit``), reading stops once that many parsed."""
        records, issues = [], []
        for row in iter_rows(path, split=split, subset=self.hparams.subset):
            if need is not None and len(records) >= need:
                break
            try:
                prompt, responses = parse_ranking(row.data)
            except RecordError as err:
                issues.append(Issue(row.source, row.line, err.field, err.message))
                continue
            where = row.source if row.line is None else f"{row.source}:{row.line}"  # for messages after encoding
            records.append({"prompt": prompt, "responses": responses, "row": where})
        if issues and not self.hparams.skip_invalid:
            raise DataError(
                f"{path}: {len(issues)} invalid ranked rows (set data.skip_invalid: true to drop them)", issues
            )
        if issues:
            log.warning("%s: dropped %d invalid ranked rows", path, len(issues))
        if not records:
            raise ValueError(f"{path}: no usable rankings")
        return records

    def _encode_one(self, record: dict) -> dict:
        tok, prompt = self.tokenizer, record["prompt"]
        encoded = [
            encode_conversation(tok, [*prompt, {"role": "assistant", "content": r}], train_on="last")
            for r in record["responses"]
        ]
        # train_on="last": the labels mark exactly the final reply, so its first label is where the reply starts
        starts = [next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX) for e in encoded]
        if any(e.input_ids[:s] != encoded[0].input_ids[: starts[0]] for e, s in zip(encoded, starts)):
            raise DataError(
                "the responses of one ranking render different prompts; the chat template depends on the reply"
            )
        prompt_ids = encoded[0].input_ids[: starts[0]]
        responses = [e.input_ids[s:] for e, s in zip(encoded, starts)]
        prompt_ids, responses, truncated = truncate(prompt_ids, responses, self.hparams.max_length)
        return {"prompt_ids": prompt_ids, "responses_ids": responses, "truncated": truncated}

    def _collator(self):
        pad_id = self.tokenizer.pad_token_id

        def collate(examples: list[dict]) -> RankingBatch:
            seqs = [e["prompt_ids"] + r for e in examples for r in e["responses_ids"]]
            multiple_of = self.hparams.pad_to_multiple_of
            # a reward model reads the last real token of each row; no token is a training target
            mask = pad([[1] * len(s) for s in seqs], 0, multiple_of=multiple_of)
            ids = pad(seqs, pad_id, multiple_of=multiple_of)
            tokens = Tokens(ids, torch.full_like(ids, IGNORE_INDEX), mask)
            return RankingBatch(tokens, torch.tensor([len(e["responses_ids"]) for e in examples]))

        return collate
