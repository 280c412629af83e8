"""Optimiser settings: the learning-rate schedule and AdamW (the default), or an injected optimiser class."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import transformers
from lightning.pytorch.cli import OptimizerCallable

from rlft.registry import import_object

SchedulerName = Literal[tuple(kind.value for kind in transformers.SchedulerType)]


@dataclass(frozen=True)  # frozen: one default instance is shared by every method's signature
class OptimizerSettings:
    """The learning-rate schedule, and the settings of the default optimiser (AdamW).

    Args:
        lr: Peak learning rate; default the method's ``default_lr`` (DPO 5e-6, SFT 2e-4, ...).
        weight_decay: Decoupled weight decay (not applied to biases and norm weights).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warmup steps (overrides ``warmup_ratio`` when > 0).
        warmup_ratio: Warmup as a share of all optimisation steps.
        scheduler: A transformers schedule: ``cosine``, ``linear``, ``constant_with_warmup``, ``cosine_with_min_lr`` ...
        min_lr_ratio: Floor of the cosine schedule relative to ``lr`` (for ``cosine_with_min_lr``).
    """

    lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: SchedulerName = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a YAML list compares equal to the default


# the fields of OptimizerSettings that configure AdamW itself: an injected optimiser takes its own instead
_ADAMW_FIELDS = ("lr", "weight_decay", "betas", "eps")


def optimizer_spec(optimizer: OptimizerCallable | dict | None) -> dict | None:
    """``{"class_path", "init_args"}`` of an injected optimiser: plain data, so hparams stay weights-only."""
    if optimizer is None or isinstance(optimizer, dict):
        return optimizer
    # jsonargparse's callable is a partial whose positional arguments end with the class; a user's is partial(cls)
    classes = [a for a in (getattr(optimizer, "func", None), *getattr(optimizer, "args", ())) if isinstance(a, type)]
    if not isinstance(optimizer, functools.partial) or not classes:
        raise TypeError(
            "optimizer must be given as {class_path: torch.optim.SGD, init_args: {...}} (or functools.partial of an "
            f"optimizer class with keyword arguments), got {optimizer!r}"
        )
    cls = classes[-1]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(optimizer.keywords)}


def optimizer_factory(spec: dict) -> OptimizerCallable:
    module, _, name = spec["class_path"].rpartition(".")
    return functools.partial(import_object(f"{module}:{name}", "optimizer"), **spec.get("init_args", {}))


def resolve_optimizer(
    optim: OptimizerSettings | dict, optimizer: OptimizerCallable | dict | None, default_lr: float
) -> tuple[OptimizerSettings, dict | None]:
    """The settings with their lr filled in (the method's default, or the injected optimiser's own), and the
    injected optimiser's spec; AdamW's own settings next to another optimiser are refused (they would not apply)."""
    optim = OptimizerSettings(**optim) if isinstance(optim, dict) else optim
    spec = optimizer_spec(optimizer)
    if spec is not None:
        # the optimiser was given whole: AdamW's settings set here would silently not apply
        own_lr = spec.get("init_args", {}).get("lr")
        changed = [f for f in _ADAMW_FIELDS[1:] if getattr(optim, f) != getattr(OptimizerSettings(), f)]
        if optim.lr is not None and optim.lr != own_lr:  # a checkpoint's hparams repeat the optimiser's lr
            changed.insert(0, "lr")
        if changed:
            names = ", ".join(f"optim.{f}" for f in changed)
            raise ValueError(
                f"{names} set the default AdamW, but optimizer is {spec['class_path']}, which takes its own: "
                "set them in optimizer.init_args and unset them here (e.g. "
                f"--model.init_args.optim '{{\"{changed[0]}\": null}}')"
            )
        optim = dataclasses.replace(optim, lr=own_lr)
    elif optim.lr is None:
        optim = dataclasses.replace(optim, lr=default_lr)
    return optim, spec
