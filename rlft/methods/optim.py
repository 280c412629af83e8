"""Optimiser settings: the learning-rate schedule and AdamW (the default), or an injected optimiser class.

An injected class may come from an optional package, e.g. bitsandbytes' 8-bit and paged optimisers
(``optimizer: {class_path: bitsandbytes.optim.AdamW8bit, init_args: {lr: 2.0e-4}}``, extra ``qlora``): one that is
not installed, or that cannot step the parameters it is given (sharded DTensors), is refused with a line naming
the setting before training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import transformers
from lightning.pytorch.cli import OptimizerCallable

from rlft.registry import import_object

SchedulerName = Literal[tuple(kind.value for kind in transformers.SchedulerType)]

# optional packages that ship optimisers, and how to install them
OPTIMIZER_PACKAGES: dict[str, str] = {"bitsandbytes": "pip install 'rlft[qlora]'"}

if importlib.util.find_spec("bitsandbytes") is not None:
    # imported so that `optimizer: AdamW8bit` resolves on the command line too (jsonargparse looks a short class name
    # up among the imported subclasses of torch.optim.Optimizer); peft imports it anyway when it is installed
    with contextlib.suppress(Exception):  # a bitsandbytes that cannot load must not stop rlft from importing
        import bitsandbytes.optim  # noqa: F401


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
    """The injected optimiser's class with its ``init_args``, called on the parameter groups when training starts.

    Raises:
        ValueError: the class's package is not installed (with the command that installs it).
    """
    class_path = spec["class_path"]
    module, _, name = class_path.rpartition(".")
    try:
        cls = import_object(f"{module}:{name}", "optimizer")
    except ImportError as error:
        package = module.partition(".")[0]
        install = OPTIMIZER_PACKAGES.get(package, f"pip install {package}")
        raise ValueError(
            f"optimizer {class_path} needs {package}, which cannot be imported here ({error.__cause__ or error}): "
            f"{install}, or choose another optimizer"
        ) from error
    return functools.partial(_build_optimizer, cls, spec.get("init_args", {}))


def _build_optimizer(cls: type, init_args: dict, params: Iterable) -> torch.optim.Optimizer:
    """``cls(params, **init_args)``, after refusing parameters that it cannot step (it would fail at the first step)."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    refuse = _REFUSALS.get(cls.__module__.partition(".")[0])
    if refuse is not None:
        refuse(cls, tensors)
    return cls(groups, **init_args)


def _refuse_for_bitsandbytes(cls: type, params: list[torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise ValueError(
            f"optimizer {cls.__module__}.{cls.__qualname__} cannot step FSDP2's sharded (DTensor) parameters: "
            "bitsandbytes' kernels take plain tensors. Use it with DeepSpeed ZeRO (configs/trainer/deepspeed_zero2.yaml"
            " or deepspeed_zero3.yaml), DDP or one device, or use the default AdamW (unset model.optimizer) with FSDP"
        )


# per package: a check of the parameters (device, layout) that its optimisers cannot step
_REFUSALS: dict[str, Callable[[type, list[torch.Tensor]], None]] = {"bitsandbytes": _refuse_for_bitsandbytes}


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
