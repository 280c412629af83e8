"""Reading evaluation data through rlft's own readers and converters (one place for file handling)."""

from __future__ import annotations

from pathlib import Path

from rlft.data.formats import convert
from rlft.data.sources import read_rows


def load_records(
    path: str | Path, *, kind: str, format: str = "auto", limit: int | None = None, on_invalid: str = "skip"
) -> list[dict]:
    """Canonical records (``sft``, ``pairs`` or ``prompts``) from any supported file or hub dataset.

    Args:
        path: JSONL/JSON/Parquet/CSV file, a folder, or a hub dataset name.
        kind: ``"sft"``, ``"pairs"`` or ``"prompts"``.
        format: Input format name or ``"auto"``.
        limit: Keep only the first ``limit`` records (``None`` keeps all).
        on_invalid: ``"skip"`` drops invalid rows (counted in the conversion report); ``"error"`` stops with every
            invalid row named by file and line (see :func:`rlft.data.formats.convert`).
    """
    rows = read_rows(str(path))
    if not rows:
        raise ValueError(f"{path}: no rows to evaluate (the file is empty)")
    records, _ = convert(rows, kind=kind, format=format, on_invalid=on_invalid)
    return records[:limit] if limit is not None else records


def load_raw_rows(path: str | Path, *, limit: int | None = None) -> list[dict]:
    """Rows as plain dicts (for task files whose fields are not a training format, e.g. question/answer)."""
    rows = [row.data for row in read_rows(str(path))]
    if not rows:
        raise ValueError(f"{path}: no rows to evaluate (the file is empty)")
    return rows[:limit] if limit is not None else rows
