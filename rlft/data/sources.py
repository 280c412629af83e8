"""Readers that turn user files (or hub datasets) into rows with their origin attached.

Each :class:`Row` remembers its file and 1-based line so that every later error can point at the exact place.
Supported: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` (JSON ones also gzip-compressed), directories of such files,
directories written by ``datasets.Dataset.save_to_disk``, and hub dataset names via ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rlft.data.errors import DataError

__all__ = ["Row", "read_rows", "SUFFIXES"]


@dataclass(frozen=True)
class Row:
    """One input row and where it came from.

    Attributes:
        data: The row as a dict (JSON object, CSV row, parquet/hub row).
        source: File path or ``"name[split]"`` for hub datasets.
        line: 1-based JSONL line, CSV data row, JSON array index + 1 or parquet/hub row index + 1.
    """

    data: dict
    source: str
    line: int | None


# Keys under which JSON files commonly wrap their list of records ({"data": [...], "version": ...}).
_WRAPPER_KEYS = ("data", "rows", "records", "examples")
# A hub id is "name" or "owner/name" made of these characters; anything else can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Directory files named after a split ("train.jsonl", "test-00000.parquet") are filtered by the requested split;
# the aliases map the usual spellings of the held-out split onto one name.
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}  # fmt: skip


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _object_or_error(value: object, source: str, line: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"{source}:{line}: expected a JSON object (one record per line) but found {type(value).__name__}"
        )
    return value


def _read_jsonl(path: Path, split: str) -> list[Row]:
    rows = []
    with _open_text(path) as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))  # so error columns refer to this line
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); "
                    "each line must be one complete JSON object"
                ) from err
            rows.append(Row(_object_or_error(value, str(path), number), str(path), number))
    return rows


def _records_in(value: dict, path: Path, split: str) -> list | None:
    """The list of records inside a JSON object that wraps them, or ``None`` when the object is one record."""
    for key in (split, *_WRAPPER_KEYS):
        if isinstance(value.get(key), list):
            return value[key]
    if value and all(key.lower() in _SPLIT_ALIASES for key in value):  # {"train": [...], "test": [...]}
        raise DataError(f"{path}: JSON object has no list for split '{split}'; it has: {', '.join(value)}")
    return None


def _read_json(path: Path, split: str) -> list[Row]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level objects: it is JSON Lines with a .json name
            return _read_jsonl(path, split)
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    if isinstance(value, dict):
        records = _records_in(value, path, split)
        if records is None:
            return [Row(value, str(path), 1)]
        value = records
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects but found {type(value).__name__}")
    return [Row(_object_or_error(item, str(path), index), str(path), index) for index, item in enumerate(value, 1)]


def _decode_cell(text: str) -> object:
    # Nested fields (message lists, instances) can only live in a CSV cell as JSON text.
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


def _read_csv(path: Path, split: str) -> list[Row]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return []
        rows = []
        for number, record in enumerate(reader, start=1):
            if None in record:
                raise DataError(
                    f"{path}:{number}: CSV row has {len(reader.fieldnames) + len(record[None])} cells "
                    f"but the header has {len(reader.fieldnames)}"
                )
            data = {key: _decode_cell(value) if value is not None else None for key, value in record.items()}
            rows.append(Row(data, str(path), number))
    return rows


def _read_parquet(path: Path, split: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({err})") from err
    return [Row(data, str(path), index) for index, data in enumerate(table.to_pylist(), start=1)]


_READERS: dict[str, Callable[[Path, str], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".json.gz": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
SUFFIXES = tuple(_READERS)


def _reader_for(path: Path) -> Callable[[Path, str], list[Row]] | None:
    name = path.name.lower()
    # Longest suffix first so ".jsonl.gz" wins over ".gz"-less matches.
    for suffix in sorted(_READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return _READERS[suffix]
    return None


def _read_file(path: Path, split: str) -> list[Row]:
    reader = _reader_for(path)
    if reader is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    try:
        return reader(path, split)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: corrupt gzip file ({err})") from err


def _split_of(path: Path, root: Path) -> str | None:
    for part in path.relative_to(root).parts:
        lowered = part.lower()
        for name, canonical in _SPLIT_ALIASES.items():
            if re.match(rf"^{name}(?![a-z])", lowered):
                return canonical
    return None


def _read_saved_dataset(path: Path, split: str) -> list[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: saved dataset has no split '{split}'; available: {', '.join(loaded)}")
        loaded = loaded[split]
    source = f"{path}[{split}]"
    return [Row(dict(item), source, index) for index, item in enumerate(loaded, start=1)]


def _read_directory(path: Path, split: str) -> list[Row]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_saved_dataset(path, split)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _reader_for(p) and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path}: directory contains no data files ({', '.join(SUFFIXES)})")
    splits = {p: _split_of(p, path) for p in files}
    if any(splits.values()):
        # Files are named by split (train.jsonl, test.jsonl): read only the requested one.
        wanted = [p for p in files if splits[p] == _SPLIT_ALIASES.get(split.lower(), split)]
        if not wanted:
            found = sorted({s for s in splits.values() if s})
            raise DataError(f"{path}: no files for split '{split}'; files exist for splits: {', '.join(found)}")
        files = wanted
    return [row for file in files for row in _read_file(file, split)]


def _read_hub(name: str, split: str, subset: str | None) -> list[Row]:
    try:
        import datasets

        loaded = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # offline, missing, gated, bad config: all surface as different exception types
        raise DataError(
            f"could not load '{name}' (split '{split}'{f', subset {subset!r}' if subset else ''}): it is not a local "
            f"file and loading it from the Hugging Face hub failed ({type(err).__name__}: {err}). If the hub is "
            "unreachable, download the data elsewhere and pass a local .jsonl/.json/.csv/.parquet file or directory."
        ) from err
    source = f"{name}[{split}]"
    return [Row(dict(item), source, index) for index, item in enumerate(_iterate(loaded), start=1)]


def _iterate(loaded: object) -> Iterator[dict]:
    yield from loaded  # Dataset and IterableDataset both iterate as dicts


def read_rows(path: str, *, split: str = "train", subset: str | None = None) -> list[Row]:
    """Read every row of a local file, a directory of files, a saved dataset or a hub dataset.

    Args:
        path: Local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``.jsonl.gz``/``.json.gz`` too), a directory of
            them (files named ``train*``/``test*``... are filtered by ``split``), a ``save_to_disk`` directory, or a
            Hugging Face hub dataset name.
        split: Split to read for hub datasets, saved datasets and split-named directories.
        subset: Hub dataset configuration name; for a local directory, a sub-directory to read.

    Returns:
        The rows in file order; blank JSONL lines are skipped (line numbers still count them).

    Raises:
        DataError: For malformed files (with file and line), missing files and unreachable hub datasets.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if subset is not None:
            local = local / subset
            if not local.is_dir():
                raise DataError(f"{path}: no sub-directory '{subset}' (subset) in this directory")
        return _read_directory(local, split)
    if local.is_file():
        return _read_file(local, split)
    if _HUB_ID.match(path) is None or _reader_for(local) is not None:
        raise DataError(
            f"{path}: file not found (and it is not a Hugging Face hub dataset name such as 'owner/name'); "
            "check the path"
        )
    return _read_hub(path, split, subset)
