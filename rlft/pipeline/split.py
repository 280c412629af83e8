"""Deterministic train / held-out split of preference pairs, so every stage trains on one side and the evaluation
reads only the other.

The split is by a hash of each pair's prompt (not by row position): the same prompt never lands on both sides, and
adding or reordering files moves no existing prompt to the other side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from rlft.data.formats import convert
from rlft.data.sources import read_rows


def _prompt_key(record: dict) -> str:
    return json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)


def _bucket(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    paths: Sequence[str], out_dir: str | Path, *, heldout_fraction: float = 0.15, seed: int = 0, format: str = "auto"
) -> dict:
    """Read pair files, convert them to canonical pair records, and write ``train_pairs.jsonl`` and
    ``heldout_pairs.jsonl`` under ``out_dir``; returns counts and file paths.

    Invalid rows (e.g. an empty reply) are dropped and counted, never silently: the counts are in the result.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not paths:
        raise ValueError("data.paths is empty: give at least one preference-pair file")
    records, dropped = [], {}
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"data.paths: {path} does not exist")
        converted, report = convert(read_rows(str(path)), kind="pairs", format=format, on_invalid="skip")
        records += converted
        for reason, count in report.filtered.items():
            dropped[reason] = dropped.get(reason, 0) + count
    sides: dict[str, list[dict]] = {"train": [], "heldout": []}
    for record in records:
        sides["heldout" if _bucket(_prompt_key(record), seed) < heldout_fraction else "train"].append(record)
    if not sides["train"] or not sides["heldout"]:
        raise ValueError(
            f"the split left an empty side ({len(sides['train'])} train, {len(sides['heldout'])} held "
            f"out) from {len(records)} pairs; use more data or another heldout_fraction"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for side, rows in sides.items():
        files[side] = out / f"{side}_pairs.jsonl"
        with open(files[side], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {
        "train": len(sides["train"]),
        "heldout": len(sides["heldout"]),
        "dropped": dropped,
        "files": {k: str(v) for k, v in files.items()},
    }
