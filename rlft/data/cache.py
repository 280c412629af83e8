"""A cache of tokenised data sets, so repeated runs and tuning trials convert and tokenise each data set once.

The key hashes everything the encoded examples depend on: the content of every data file read (not its name or
mtime), the tokenizer (name, vocabulary, added and special tokens), its chat template, the data module's options
(kind, format, max lengths, split, limits, ...) and the source of the ``rlft.data`` code itself, so a changed input,
template or converter can never be served stale. Entries live in ``$RLFT_DATA_CACHE``, else
``$RLFT_CACHE/data`` (``RLFT_CACHE`` also holds pulled models; default ``~/.cache/rlft``), one pickle per key,
written atomically so concurrent processes (DDP ranks, parallel trials) can share them. Hub datasets are not cached
here (``datasets`` caches their download; their content cannot be hashed before reading it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import tempfile
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "dataset_key", "load", "save", "tokenizer_fingerprint"]

# options of PreferenceDataModule that change what setup() produces (batching/loader options do not)
KEY_OPTIONS = (
    "path",
    "format",
    "val_path",
    "val_fraction",
    "max_length",
    "max_prompt_length",
    "seed",
    "limit",
    "val_limit",
    "skip_invalid",
    "dedupe",
    "split",
    "subset",
)
_DATA_CODE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """``$RLFT_DATA_CACHE``, else ``$RLFT_CACHE/data``, default ``~/.cache/rlft/data``."""
    if folder := os.environ.get("RLFT_DATA_CACHE"):
        return Path(folder)
    root = os.environ.get("RLFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlft")
    return Path(root) / "data"


def _hash_file(path: Path, digest) -> None:
    digest.update(path.name.encode() + b"\0")
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def content_hash(path: str) -> str | None:
    """SHA-256 of a local file or of every file under a folder (sorted); ``None`` for a hub dataset name."""
    local = Path(path)
    if not local.exists():
        return None
    digest = hashlib.sha256()
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for file in files:
        _hash_file(file, digest)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What of a tokenizer decides the ids: its name, a vocabulary hash, added/special tokens and chat template."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    added = sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items())
    return {
        "name": getattr(tokenizer, "name_or_path", ""),
        "class": type(tokenizer).__name__,
        "vocab": vocab,
        "added": added,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
    }


def _code_hash() -> str:
    digest = hashlib.sha256()
    for file in sorted(_DATA_CODE.glob("*.py")):
        _hash_file(file, digest)
    return digest.hexdigest()


def _class_hash(cls: type | None) -> str:
    """A data module subclass may encode differently: its name and the source of every module of its MRO count."""
    if cls is None:
        return ""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        digest.update(f"{klass.__module__}.{klass.__qualname__}".encode())
        try:
            source = inspect.getsourcefile(klass)
        except TypeError:  # builtins (object)
            continue
        if source and Path(source).is_file() and not Path(source).is_relative_to(_DATA_CODE):
            _hash_file(Path(source), digest)
    return digest.hexdigest()


def dataset_key(kind: str, tokenizer, options: dict, module_class: type | None = None) -> str | None:
    """The cache key of one ``setup()``; ``None`` when an input is not a local file (not cacheable)."""
    files = {}
    for name in ("path", "val_path"):
        if options.get(name):
            digest = content_hash(options[name])
            if digest is None:
                return None
            files[name] = digest
    material = {
        "kind": kind,
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": {k: options.get(k) for k in KEY_OPTIONS},
        "code": _code_hash(),
        "class": _class_hash(module_class),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str) -> dict | None:
    """The cached ``{"train", "val", "stats", "report"}`` or ``None`` (missing or unreadable entries are misses)."""
    path = cache_dir() / f"{key}.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle)  # noqa: S301 - our own cache folder, written by save() below
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file is a miss, never a crash
        log.warning("ignoring unreadable data cache entry %s (%s)", path, error)
        return None
    entry["stats"] = {name: Counter(values) for name, values in entry["stats"].items()}
    return entry


def save(key: str, train: list[dict], val: list[dict], stats: dict, report: list[str]) -> Path:
    """Write an entry atomically (temp file + rename), so readers never see half of one."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"train": train, "val": val, "stats": {k: dict(v) for k, v in stats.items()}, "report": report}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(entry, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, folder / f"{key}.pkl")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / f"{key}.pkl"
