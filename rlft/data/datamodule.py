"""``PreferenceDataModule``: the one data module every rlft method trains on.

The method, not the user, decides what the data must provide (its data kind, :mod:`rlft.data.kinds`): SFT asks for
conversations, DPO/ORPO/reward models for preference pairs, PPO/GRPO for prompts, KTO for unpaired feedback. The
module reads any supported file or hub dataset, converts it to that kind of canonical record, validates it, tokenizes
with the model's own chat template and serves dynamically padded batches whose order survives a resume.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from rlft.data import cache as data_cache
from rlft.data.batches import Batch
from rlft.data.collate import Collator, batch_fingerprint
from rlft.data.encoding import TemplateError
from rlft.data.errors import DataError
from rlft.data.formats import convert
from rlft.data.kinds import data_kind
from rlft.data.sources import iter_rows

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle that can skip what a resumed run already consumed.

    It subclasses ``DistributedSampler`` so Lightning shards with it instead of wrapping it, and a resumed epoch
    sees exactly the order (and position) of the interrupted one.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class PreferenceDataModule(L.LightningDataModule):
    """Reads, validates, tokenizes and batches SFT conversations, preference pairs, RL prompts or unpaired feedback.

    Args:
        path: A local JSONL/JSON/Parquet/CSV file, a folder of them, or a Hugging Face dataset name.
        format: Input format name, or ``"auto"`` to detect it (messages, sharegpt, prompt_completion, alpaca, dolly,
            hh_rlhf, preference, piqa, alpaca_seed, ranked, prompt_only, unpaired).
        val_path: Separate validation data; when unset, ``val_fraction`` of ``path`` is held out.
        val_fraction: Share of the training data held out for validation (deterministic given ``seed``).
        batch_size: Examples (pairs, prompts) per training batch and per device.
        eval_batch_size: Batch size for validation (default: ``batch_size``).
        max_length: Longest token sequence; longer examples keep the end of the prompt and are counted.
        max_prompt_length: Longest prompt for generation (prompts kind); default ``max_length // 2``.
        seed: Seed of the split and of the shuffle order.
        limit: Use only the first N training examples (after the split), e.g. for smoke runs. Reading stops early:
            with ``val_path`` after N records; with ``val_fraction`` after enough records for the split to leave N
            (and ``val_limit``) examples — the split is then over the records read, not the whole file.
        val_limit: Use only the first N validation examples (reading a separate ``val_path`` stops after N).
        skip_invalid: Drop invalid rows with a count per reason instead of stopping with an error listing them.
        dedupe: Drop exact duplicate records (counted in the log).
        split: Split to read from a hub dataset or a folder with split files.
        subset: Hub dataset configuration name.
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round padded lengths up (helps tensor cores on GPU).
        shuffle: Shuffle the training order each epoch (seeded; the order survives a resume).
        packing: Padding-free batches: the batch's sequences are concatenated into one row with restarting
            ``position_ids`` (no pad tokens computed, no attention across examples). SFT and pairs.
        cache: Reuse the tokenised examples of an earlier run with the same files (by content), tokenizer, chat
            template and options (``$RLFT_DATA_CACHE``, default ``~/.cache/rlft/data``); ``false`` re-tokenises.
    """

    def __init__(
        self,
        path: str,
        format: str = "auto",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        seed: int = 42,
        limit: int | None = None,
        val_limit: int | None = None,
        skip_invalid: bool = False,
        dedupe: bool = True,
        split: str = "train",
        subset: str | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        shuffle: bool = True,
        packing: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__()
        _check_ranges(
            val_fraction=(val_fraction, 0.0 <= val_fraction < 1.0, "in [0, 1)"),
            batch_size=(batch_size, batch_size >= 1, ">= 1"),
            eval_batch_size=(eval_batch_size, eval_batch_size is None or eval_batch_size >= 1, ">= 1"),
            max_length=(max_length, max_length >= 2, ">= 2 (a prompt token and a trained token)"),
            max_prompt_length=(
                max_prompt_length,
                max_prompt_length is None or 1 <= max_prompt_length < max_length,
                f">= 1 and < max_length ({max_length})",
            ),
            limit=(limit, limit is None or limit >= 1, ">= 1"),
            val_limit=(val_limit, val_limit is None or val_limit >= 0, ">= 0"),
            num_workers=(num_workers, num_workers >= 0, ">= 0"),
            pad_to_multiple_of=(pad_to_multiple_of, pad_to_multiple_of is None or pad_to_multiple_of >= 1, ">= 1"),
        )
        self.save_hyperparameters()
        self.kind: str | None = None
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.stats: dict[str, Counter] = {}
        self.report: list[tuple[int, str]] = []  # (level, line) of the data report, replayed on a cache hit
        self.rows_read: dict[str, int] = {}  # path -> rows read from it (fewer than it has when data.limit stops early)
        self._collators: list[Collator] = []

    def attach(self, kind: str, tokenizer) -> PreferenceDataModule:
        """Tell the module what the method needs (``sft``, ``pairs``, ``prompts``, ``unpaired``) and which tokenizer
        to use."""
        data_kind(kind)  # an unknown kind fails here, naming the known ones
        self.kind, self.tokenizer = kind, tokenizer
        return self

    def _records(self, path: str, split: str, need: int | None = None) -> list[dict]:
        """Records of ``path``; with ``need``, reading stops once that many records convert (rows dropped as
        invalid or duplicate make it read on, in doubling chunks), so ``limit: 10`` on a million-line file reads
        a few dozen lines."""
        hp = self.hparams
        stream = iter_rows(path, split=split, subset=hp.subset)
        rows, chunk, more = [], need, True
        while True:
            batch = list(itertools.islice(stream, chunk)) if chunk is not None else list(stream)
            rows += batch
            more = chunk is not None and len(batch) == chunk
            if not rows:
                raise DataError(f"{path}: no rows (the file or split '{split}' is empty)")
            records, report = convert(
                rows,
                kind=self.kind,
                format=hp.format,
                on_invalid="skip" if hp.skip_invalid else "error",
                dedupe=hp.dedupe,
                require_records=False,
            )
            if not more or len(records) >= need:
                break
            chunk = max(chunk, need - len(records)) * 2
        stream.close()  # releases the open file now rather than at garbage collection
        self.rows_read[path] = len(rows)
        self._note(logging.INFO, report.summary() + (" (stopped reading at data.limit)" if more else ""))
        if sum(report.filtered.values()):
            self._note(logging.WARNING, report.details())
        if not records:
            raise DataError(f"{path}: no usable {self.kind} records ({report.summary()})")
        # where each record came from, for messages about it after tokenization (kept out of the record itself)
        return [{**r, "row": where} for r, where in zip(records, report.locations)]

    def setup(self, stage: str | None = None) -> None:
        if self.kind is None and self.trainer is not None:
            module = self.trainer.lightning_module
            self.attach(module.data_kind, module.tokenizer)
        if self.kind is None or self.tokenizer is None:
            raise RuntimeError("PreferenceDataModule needs attach(kind, tokenizer) or a trainer with an rlft method")
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        kind = data_kind(self.kind)
        if hp.packing and kind.pack is None:  # before the cache: packing is not in its key
            raise DataError(
                f"data.packing: true is not possible for {self.kind} data ({kind.unpacked_because}); "
                "set data.packing: false"
            )
        key = data_cache.dataset_key(self.kind, self.tokenizer, dict(hp), type(self)) if hp.cache else None
        if key and (entry := data_cache.load(key)):
            self.train_set, self.val_set, self.stats, self.report = (
                entry[k] for k in ("train", "val", "stats", "report")
            )
            log.info("%d train / %d val examples from the data cache (%s)", len(self.train_set), len(self.val_set), key)
            for level, message in self.report:
                log.log(level, message)
            return
        if hp.val_path:
            val_split = "validation" if hp.val_path == hp.path else hp.split
            train = self._records(hp.path, hp.split, hp.limit)
            val = self._records(hp.val_path, val_split, hp.val_limit) if hp.val_limit != 0 else []
        else:
            records = self._records(hp.path, hp.split, _split_need(hp.limit, hp.val_limit, hp.val_fraction))
            order = list(range(len(records)))
            random.Random(hp.seed).shuffle(order)
            n_val = round(len(records) * hp.val_fraction)
            if hp.val_fraction > 0 and n_val == 0 and len(records) > 1:
                n_val = 1
            val_ids = set(order[:n_val])
            train = [r for i, r in enumerate(records) if i not in val_ids]
            val = [r for i, r in enumerate(records) if i in val_ids]
        train, val = train[: hp.limit], val[: hp.val_limit]
        self.train_set = self._encode(train, "train")
        self.val_set = self._encode(val, "val")
        if key:
            data_cache.save(key, self.train_set, self.val_set, self.stats, self.report)

    def _encode(self, records: list[dict], name: str) -> list[dict]:
        hp = self.hparams
        encoded, truncated, invalid = [], 0, {}
        for record in records:
            try:
                example = self._encode_one(record)
            except TemplateError as err:  # e.g. a content literal this tokenizer cannot encode as text
                invalid.setdefault(f"not encodable ({err})", []).append(record["row"])
                continue
            example["row"] = record["row"]
            truncated += bool(example.pop("truncated"))
            reason = _unusable(self.kind, example)
            if reason:
                invalid.setdefault(reason, []).append(record["row"])
                continue
            encoded.append(example)
        if invalid:
            counts = "; ".join(f"{len(rows)} {reason} (e.g. {', '.join(rows[:3])})" for reason, rows in invalid.items())
            message = f"{name}: {sum(map(len, invalid.values()))} of {len(records)} examples are unusable: {counts}"
            if not hp.skip_invalid:
                raise DataError(
                    f"{message}. Raise data.max_length (now {hp.max_length}), fix the rows, or pass "
                    "--data.skip_invalid true to drop them (counted)"
                )
            log.warning("%s; dropped (skip_invalid)", message)
            if not encoded:
                raise DataError(f"{message}: nothing left to train on")
        self.stats[name] = Counter(examples=len(encoded), truncated=truncated)
        for reason, rows in invalid.items():
            self.stats[name][reason] = len(rows)
        if truncated:
            kept = "; plain text keeps its start" if self.kind == "sft" else ""
            self._note(
                logging.WARNING,
                f"{name}: {truncated} of {len(encoded)} examples were longer than max_length="
                f"{hp.max_length} and were truncated (prompt start dropped{kept})",
            )
        return encoded

    def _note(self, level: int, message: str) -> None:
        """Log a data report line and keep it, so a run served from the cache reports the same."""
        log.log(level, message)
        self.report.append((level, message))

    def _encode_one(self, record: dict) -> dict:
        hp = self.hparams
        prompt_length = hp.max_prompt_length or hp.max_length // 2
        return data_kind(self.kind).encode(
            self.tokenizer, record, max_length=hp.max_length, max_prompt_length=prompt_length
        )

    def _collator(self) -> Collator:
        hp = self.hparams
        collator = Collator(self.kind, self.tokenizer.pad_token_id, hp.pad_to_multiple_of, packing=hp.packing)
        self._collators = [*self._collators[-3:], collator]
        return collator

    def rows_of(self, batch: Batch) -> list[str] | None:
        """``file:line`` of the examples in a batch this module served (``None`` when unknown, e.g. workers)."""
        key = batch_fingerprint(batch)
        for collator in reversed(self._collators):
            if key in collator.recent_rows:
                return collator.recent_rows[key]
        return None

    def _batches_per_epoch(self) -> int:
        trainer, hp = self.trainer, self.hparams
        per_rank = math.ceil(len(self.train_set) / trainer.world_size)
        batches = math.ceil(per_rank / hp.batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            return min(batches, limit)
        return batches if limit is None or limit >= 1.0 else int(batches * limit)

    def _consumed_batches(self) -> int:
        """Batches of the current epoch that a resumed run has already trained on."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        # a checkpoint written on the last batch of an epoch resumes at the start of the next one: skipping
        # `ready` batches there would drop a whole epoch
        return 0 if ready >= self._batches_per_epoch() else ready

    def _generator(self) -> torch.Generator:
        # a private generator keeps DataLoader iterators from drawing on the global RNG, which would shift dropout
        # masks after a resume
        return torch.Generator().manual_seed(self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(len(self.train_set), seed=hp.seed, shuffle=hp.shuffle, num_replicas=world, rank=rank)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        sampler.skip = self._consumed_batches() * hp.batch_size
        return DataLoader(
            self.train_set,
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=self._collator(),
            num_workers=hp.num_workers,
            generator=self._generator(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        hp = self.hparams
        return DataLoader(
            self.val_set,
            batch_size=hp.eval_batch_size or hp.batch_size,
            shuffle=False,
            collate_fn=self._collator(),
            num_workers=hp.num_workers,
            generator=self._generator(),
        )

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


def _split_need(limit: int | None, val_limit: int | None, val_fraction: float) -> int | None:
    """Records to read so that the ``val_fraction`` split of them still gives ``limit`` training (and ``val_limit``
    validation) examples; ``None`` (read everything) without a limit.

    With ``limit`` set, the split is taken over the records read, not the whole file: a smoke run on the first rows
    of a large file should not read and convert all of it. Without ``val_limit`` the held-out share is then
    ``val_fraction`` of what was read.
    """
    if limit is None:
        return None
    size = limit
    while True:  # smallest size whose split matches the datamodule's rounding (at most a few steps)
        n_val = round(size * val_fraction)
        if val_fraction > 0 and n_val == 0 and size > 1:
            n_val = 1
        if size - n_val >= limit and (val_limit is None or val_fraction == 0 or n_val >= val_limit):
            return size
        size += 1 if size - n_val < limit else max(1, math.ceil((val_limit - n_val) / val_fraction))


def _check_ranges(**checks: tuple) -> None:
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"data.{name} must be {expected}, got {value!r}")


def _unusable(kind: str, example: dict) -> str | None:
    """Why an encoded example cannot train (usually: truncation to max_length removed what mattered); each kind's
    own check (:mod:`rlft.data.kinds`)."""
    return data_kind(kind).unusable(example)
