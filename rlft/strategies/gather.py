"""Full weights on every rank for a moment: the one place that knows how each strategy shards parameters.

Two jobs need the whole model on a rank while training keeps it sharded:

- **Rollouts** (PPO/GRPO generation): decoding step by step through sharded layers would all-gather every layer
  at every token, and ranks whose completions end early would stop calling the collectives the others wait for
  (a hang). Gathering once per rollout and decoding without collectives fixes both.
- **Export**: the final Hugging Face folder must hold the trained weights, not the local shard (the "empty
  adapter" that TRL/PEFT users get under ZeRO-3).

``full_weights(module)`` is a collective: every rank must enter it. Without sharding it does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _trainer_strategy(module: torch.nn.Module):
    trainer = getattr(module, "_trainer", None)
    return None if trainer is None else trainer.strategy


def _zero3_engine(module: torch.nn.Module):
    strategy = _trainer_strategy(module)
    engine = getattr(strategy, "model", None)
    if getattr(strategy, "zero_stage_3", False) and hasattr(engine, "optimizer"):
        return engine
    return None


@contextlib.contextmanager
def _zero3_unhooked(engine) -> Iterator[None]:
    """Every ZeRO-3 parameter gathered once, and ZeRO's per-module fetch/release hooks off until the end."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(offload.module.parameters()), modifier_rank=None):
        # re-registering hooks (below) gives modules new ids, so marks left under old ids by earlier forwards (a
        # PPO value head after its updates) would never be released and re-partitioning would refuse them
        for param in offload.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether parameters of ``module`` are split across ranks (ZeRO-3 or FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return any(hasattr(p, "ds_id") for p in module.parameters()) or any(
        isinstance(m, FSDPModule) for m in module.modules()
    )


_GATHERED: set[int] = set()  # modules inside full_weights now


@contextlib.contextmanager
def full_weights(module: torch.nn.Module) -> Iterator[None]:
    """Inside, every parameter of ``module`` holds its full value on every rank and forwards run without
    collectives; outside, the sharding is as before. Weights changed inside are not written back.

    Re-entrant: a nested call for a module already gathered is a no-op (ZeRO-3 refuses overlapping gathers, and a
    hook such as PPO's rollout gathers once around the core's sampling, which gathers too)."""
    if id(module) in _GATHERED:
        yield
        return
    _GATHERED.add(id(module))
    try:
        with _gathered(module):
            yield
    finally:
        _GATHERED.discard(id(module))


@contextlib.contextmanager
def _gathered(module: torch.nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    engine = _zero3_engine(module)
    if engine is not None:
        with _zero3_unhooked(engine):
            yield
        return
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if partitioned:  # built under ZeRO-3 but not yet in an engine: no fetch hooks to switch off
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield
        return
    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    # keep layers unsharded after each forward so decoding steps do not all-gather again
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in sharded]
    for handle in handles:
        if handle is not None:
            handle.wait()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(module: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``state_dict`` of ``module`` as CPU tensors, on every rank (a collective)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    zero3 = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    else:
        context = full_weights(module)
    with context:
        state = {}
        for name, value in module.state_dict().items():
            if names is None or name in names:
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                state[name] = value.detach().to("cpu", copy=True)
        return state
