"""Per-row fields of the data (a pair's ``weight``, ``margin``, ``score``; a batch serves them as
``batch.field(name)``), and nothing silent about them: a method says which numeric fields it reads
(``uses_fields``); at the start of fit every other one draws a warning naming the methods that do read it, and a
field it reads must be a number on every row."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from rlft.data.kinds import RESERVED_PAIR_KEYS, RESERVED_UNPAIRED_KEYS

log = logging.getLogger(__name__)

# what an encoded row of a data kind holds besides the data's own fields (prompts are left out: their extra fields go
# to the reward functions, which take any field)
ENCODED_KEYS = {
    "pairs": RESERVED_PAIR_KEYS,
    "unpaired": RESERVED_UNPAIRED_KEYS,
    "sft": frozenset({"input_ids", "labels", "row", "truncated"}),
}


def check_fields(module: L.LightningModule) -> None:
    """Warn (on rank 0) about each numeric per-row field of ``module``'s training data that it ignores; refuse a field
    it reads that some row lacks (a batch would carry it as a list, not a ``[B]`` tensor).

    Args:
        module: An rlft method attached to a trainer whose data module has ``kind``, ``train_set`` and ``val_set``.

    Raises:
        ValueError: A field the method reads is missing or not a number (a ``weight`` below 0) on some row.
    """
    datamodule = getattr(module.trainer, "datamodule", None)
    kind = getattr(datamodule, "kind", None)
    train, val = getattr(datamodule, "train_set", None), getattr(datamodule, "val_set", None) or []
    if not train or kind not in ENCODED_KEYS:
        return
    rows = [*train, *val]
    fields = dict.fromkeys(k for row in rows for k, v in row.items() if k not in ENCODED_KEYS[kind] and _number(v))
    for name in fields:
        if name in module.uses_fields:
            bad = [str(row.get("row", i)) for i, row in enumerate(rows) if not _number(row.get(name), name)]
            if bad:
                expected = "a number >= 0" if name == "weight" else "a finite number"
                raise ValueError(
                    f"per-row field {name!r} must be {expected} on every row; it is not on {len(bad)} "
                    f"rows, e.g. {', '.join(bad[:3])}"
                )
        elif module.trainer.is_global_zero:
            users = sorted(c.__name__ for c in _methods(type(module)) if c.data_kind == kind and name in c.uses_fields)
            log.warning(
                "%s ignores the per-row field %r of the data (methods that use it: %s); drop or rename it to "
                "silence this",
                type(module).__name__,
                name,
                ", ".join(users) or "none",
            )


def weighted_mean(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum(w * l) / sum(w)`` over per-example ``losses``; their plain mean without ``weight``."""
    if weight is None:
        return losses.mean()
    weight = weight.to(losses)
    # a batch of zero weights weighs nothing (loss 0) instead of 0/0
    return (weight * losses).sum() / weight.sum().clamp(min=torch.finfo(losses.dtype).tiny)


def _number(value, field: str = "") -> bool:
    """Whether ``value`` is a usable per-row number (a ``weight`` also >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= 0 or field != "weight"


def _methods(cls: type) -> list[type]:
    """Every rlft method class: the subclasses of the root of ``cls``'s rlft hierarchy defined in rlft."""
    root = next(c for c in reversed(cls.__mro__) if c.__module__ == "rlft.methods.base")
    found, todo = [], [root]
    while todo:
        current = todo.pop()
        todo.extend(current.__subclasses__())
        if current.__module__.startswith("rlft."):
            found.append(current)
    return found
