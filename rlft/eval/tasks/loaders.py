"""Dataset loaders for rlft's offline lm-eval tasks: read the JSONL files next to this module, never the hub.

lm-eval calls them through ``custom_dataset: !function loaders.NAME`` with the task's metadata as keyword
arguments (ignored here).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

_HERE = Path(__file__).resolve().parent


def _local(name: str) -> datasets.DatasetDict:
    with open(_HERE / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc_basics(**_metadata) -> datasets.DatasetDict:
    """24 everyday-knowledge multiple-choice questions written for rlft (2-4 choices each)."""
    return _local("rlft_mc_basics")


def gen_arithmetic(**_metadata) -> datasets.DatasetDict:
    """20 one-step arithmetic word problems written for rlft, answered with a number."""
    return _local("rlft_gen_arithmetic")
