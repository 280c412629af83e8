"""Readers that turn user files (or hub datasets) into rows with their origin attached.

Each :class:`Row` remembers its file and 1-based line so that every later error can point at the exact place.
Supported: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` (JSON ones also gzip-compressed), directories of such files,
directories written by ``datasets.Dataset.save_to_disk``, and hub dataset names via ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rlft.data.errors import DataError

__all__ = ["Row", "iter_rows", "read_rows", "SUFFIXES", "CSV_FIELD_LIMIT"]


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
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


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


def _too_deep(where: str) -> DataError:
    # json's C decoder recurses per nesting level: a hostile 100,000-level array would otherwise surface as a bare
    # RecursionError naming nothing
    return DataError(
        f"{where}: JSON nested too deeply (more than about {sys.getrecursionlimit()} levels of arrays/"
        "objects); records are flat objects of texts and message lists"
    )


def _read_jsonl(path: Path, split: str) -> Iterator[Row]:
    # a generator: rows are produced while the file is read, so a caller that needs only the first N stops early
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
            except RecursionError:
                raise _too_deep(f"{path}:{number}") from None
            yield Row(_object_or_error(value, str(path), number), str(path), number)


def _records_in(value: dict, path: Path, split: str) -> list | None:
    """The list of records inside a JSON object that wraps them, or ``None`` when the object is one record."""
    for key in (split, *_WRAPPER_KEYS):
        if isinstance(value.get(key), list):
            return value[key]
    if value and all(key.lower() in _SPLIT_ALIASES for key in value):  # {"train": [...], "test": [...]}
        raise DataError(f"{path}: JSON object has no list for split '{split}'; it has: {', '.join(value)}")
    return None


def _read_json(path: Path, split: str) -> Iterator[Row]:
    # One JSON document is parsed whole (the standard library has no streaming parser); files of many records
    # belong in JSONL, which is streamed.
    with _open_text(path) as handle:
        text = handle.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level objects: it is JSON Lines with a .json name
            yield from _read_jsonl(path, split)
            return
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    except RecursionError:
        raise _too_deep(str(path)) from None
    if isinstance(value, dict):
        records = _records_in(value, path, split)
        if records is None:
            yield Row(value, str(path), 1)
            return
        value = records
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects but found {type(value).__name__}")
    for index, item in enumerate(value, 1):
        yield Row(_object_or_error(item, str(path), index), str(path), index)


def _decode_cell(text: str) -> object:
    # Nested fields (message lists, instances) can only live in a CSV cell as JSON text.
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


# Python's csv module refuses fields over 128 KiB with a bare "_csv.Error: field larger than field limit"; a long
# document in one cell is legitimate, so allow up to this and name the file and line beyond it.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


def _read_csv(path: Path, split: str) -> Iterator[Row]:
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with _open_text(path) as handle:
            reader = csv.DictReader(handle)
            end = 0  # physical lines read so far: the header is line 1, and a quoted cell may span lines
            try:
                if reader.fieldnames is None:
                    return
                end = reader.line_num
                for record in reader:
                    # the line a data row starts on, as an editor shows it (data row k is line k+1 when no cell
                    # spans lines)
                    start, end = end + 1, reader.line_num
                    yield _csv_row(record, reader.fieldnames, path, start)
            except csv.Error as err:
                raise DataError(_csv_problem(err, path, end + 1)) from None  # the row that failed starts there
    finally:
        csv.field_size_limit(previous_limit)


def _csv_problem(err: csv.Error, path: Path, line: int) -> str:
    if "field larger than field limit" in str(err):
        return (
            f"{path}:{line}: a CSV field is larger than {CSV_FIELD_LIMIT // 2**20} MiB (rlft's limit); split the "
            "text or convert the file to JSONL"
        )
    return f"{path}:{line}: malformed CSV ({err})"


def _csv_row(record: dict, fieldnames: list[str], path: Path, line: int) -> Row:
    if None in record:
        raise DataError(
            f"{path}:{line}: CSV row has {len(fieldnames) + len(record[None])} cells "
            f"but the header has {len(fieldnames)}"
        )
    data = {}
    for key, value in record.items():
        try:
            data[key] = _decode_cell(value) if value is not None else None
        except RecursionError:
            raise _too_deep(f"{path}:{line}: field '{key}'") from None
    return Row(data, str(path), line)


def _read_parquet(path: Path, split: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)  # streamed, a row group at a time
        index = 0
        for batch in batches:
            for data in batch.to_pylist():
                index += 1
                yield Row(data, str(path), index)
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({err})") from err


_READERS: dict[str, Callable[[Path, str], Iterator[Row]]] = {
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".json.gz": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
SUFFIXES = tuple(_READERS)


def _reader_for(path: Path) -> Callable[[Path, str], Iterator[Row]] | None:
    name = path.name.lower()
    # Longest suffix first so ".jsonl.gz" wins over ".gz"-less matches.
    for suffix in sorted(_READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return _READERS[suffix]
    return None


def _read_file(path: Path, split: str) -> Iterator[Row]:
    reader = _reader_for(path)
    if reader is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    try:
        yield from reader(path, split)
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


def _read_saved_dataset(path: Path, split: str) -> Iterator[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: saved dataset has no split '{split}'; available: {', '.join(loaded)}")
        loaded = loaded[split]
    source = f"{path}[{split}]"
    for index, item in enumerate(loaded, start=1):
        yield Row(dict(item), source, index)


def _read_directory(path: Path, split: str) -> Iterator[Row]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        yield from _read_saved_dataset(path, split)
        return
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
    for file in files:
        yield from _read_file(file, split)


def _read_hub(name: str, split: str, subset: str | None) -> Iterator[Row]:
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
    for index, item in enumerate(_iterate(loaded), start=1):
        yield Row(dict(item), source, index)


def _iterate(loaded: object) -> Iterator[dict]:
    yield from loaded  # Dataset and IterableDataset both iterate as dicts


def iter_rows(path: str, *, split: str = "train", subset: str | None = None) -> Iterator[Row]:
    """The rows of a local file, a directory of files, a saved dataset or a hub dataset, read lazily.

    JSONL, CSV and Parquet files are streamed, so taking the first N rows reads little more than N; a ``.json``
    document is parsed whole (one document cannot be split).

    Args:
        path: Local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``.jsonl.gz``/``.json.gz`` too), a directory of
            them (files named ``train*``/``test*``... are filtered by ``split``), a ``save_to_disk`` directory, or a
            Hugging Face hub dataset name.
        split: Split to read for hub datasets, saved datasets and split-named directories.
        subset: Hub dataset configuration name; for a local directory, a sub-directory to read.

    Returns:
        The rows in file order, produced as they are read; blank JSONL lines are skipped (line numbers still count
        them). A missing local file fails at once; a malformed row, or an unreachable hub dataset, when reached.

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


def read_rows(path: str, *, split: str = "train", subset: str | None = None, limit: int | None = None) -> list[Row]:
    """The rows of :func:`iter_rows` as a list; with ``limit``, only the first ``limit`` are read."""
    return list(itertools.islice(iter_rows(path, split=split, subset=subset), limit))
