"""``rlft data prepare``: convert, validate and tokenise a data set once, into the cache every later run reads.

    rlft data prepare -c configs/dpo/smollm2_lora.yaml                    # the data and tokenizer of a fit config
    rlft data prepare -c configs/sft/tiny.yaml --data.path my.jsonl       # ... with fit-style overrides
    rlft data prepare --data.path my.jsonl --model smollm2-135m-instruct --kind pairs

The conversion report (rows read, records kept, what was filtered and why, truncation) is printed first, then where
the cache entry is. ``rlft fit`` and ``rlft tune`` trials with the same files (by content), tokenizer, chat template
and data options then skip conversion and tokenisation.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from rlft.data import PreferenceDataModule
from rlft.data import cache as data_cache
from rlft.models import load_tokenizer

KINDS = ("sft", "pairs", "prompts")


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _from_fit_config(argv: list[str]) -> tuple[PreferenceDataModule, str, str]:
    """The data module, kind and model string of an ``rlft fit`` config (with its overrides)."""
    from jsonargparse import ArgumentError

    from rlft.cli.tune import parse_fit_config

    try:
        config = parse_fit_config(argv)
    except ArgumentError as error:
        raise SystemExit(f"rlft data prepare: the config does not parse: {error}") from None
    data_cls = _import(config.data.class_path)
    data = data_cls(**vars(config.data.init_args))
    method = _import(config.model.class_path)
    return data, method.data_kind, config.model.init_args.model


def _from_arguments(argv: list[str]) -> tuple[PreferenceDataModule, str, str]:
    parser = ArgumentParser(prog="rlft data prepare", description=__doc__)
    parser.add_argument("--model", required=True, help="model string whose tokenizer and chat template encode")
    parser.add_argument("--kind", choices=KINDS, required=True, help="what the method trains on")
    parser.add_class_arguments(PreferenceDataModule, "data")
    args = parser.parse_args(argv)
    return PreferenceDataModule(**vars(args.data)), args.kind, args.model


def prepare(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    data, kind, model = (_from_fit_config if from_config else _from_arguments)(argv)
    if not data.hparams.cache:
        raise SystemExit("rlft data prepare: --data.cache false leaves nothing to prepare")
    path = str(data.hparams.path)
    if path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".csv", ".parquet")):
        if not Path(path).expanduser().exists():  # a local file by its look: "not a local file" would mislead
            raise FileNotFoundError(f"--data.path {path}: no such file or folder")
    tokenizer = load_tokenizer(model)
    key = data_cache.dataset_key(kind, tokenizer, dict(data.hparams), type(data))
    if key is None:
        raise SystemExit(
            f"rlft data prepare: {data.hparams.path} is not a local file or folder; hub datasets are cached by "
            "`datasets` itself and tokenised at each run"
        )
    entry = data_cache.cache_dir() / f"{key}.pkl"
    was_cached = entry.is_file()
    data.attach(kind, tokenizer).setup("fit")
    for _, line in data.report:
        print(line)
    for split, stats in data.stats.items():
        print(f"{split}: {stats['examples']} {kind} examples, {stats['truncated']} truncated to max_length")
    print(f"{'already cached' if was_cached else 'cached'}: {entry}  (tokenizer {model}, kind {kind})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nsubcommands:\n  prepare    tokenise a data set into the cache (rlft data prepare --help)")
        return
    if argv[0] != "prepare":
        raise SystemExit(f"rlft data: unknown subcommand {argv[0]!r} (available: prepare)")
    if argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    prepare(argv[1:])
