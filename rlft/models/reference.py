"""The reference policy of DPO, PPO and GRPO: one component that decides what "the model we started from" is.

Four cases, in order: a separate frozen model when one is given; the frozen ``ref`` adapter when training continues
an existing adapter (the start is base + that adapter); the LoRA policy with its adapter switched off (no second
copy of the weights, the default); otherwise an error, because a full-weight policy needs a separate reference.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch

from rlft.models.checkpoint import is_checkpoint
from rlft.models.loading import load_model, resolve_model

log = logging.getLogger(__name__)

REF_ADAPTER = "ref"
"""Name of the frozen adapter that plays the reference when training continues an existing adapter."""


def load_reference_adapter(policy: torch.nn.Module, model: str) -> bool:
    """When ``model`` names an adapter folder (e.g. an SFT result), load a frozen copy of it as ``ref``.

    Continuing an adapter, the initial policy is base + that adapter, so the reference must be too, not the raw
    base that switching the adapter off would give. Returns whether a reference adapter was loaded.
    """
    if is_checkpoint(model) or not hasattr(policy, "load_adapter"):
        return False
    adapter = resolve_model(model).adapter
    if adapter:
        policy.load_adapter(adapter, adapter_name=REF_ADAPTER, is_trainable=False)
    return bool(adapter)


@contextlib.contextmanager
def reference_model(policy: torch.nn.Module, reference: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """The reference policy: a given frozen model, else the LoRA policy's frozen ``ref`` adapter (see
    :func:`load_reference_adapter`), else the LoRA policy with its adapter disabled (no second copy of weights).

    Raises:
        ValueError: if there is neither a separate reference nor a LoRA adapter to disable.
    """
    if reference is not None:
        yield reference
    elif REF_ADAPTER in getattr(policy, "peft_config", {}):
        policy.set_adapter(REF_ADAPTER, inference_mode=True)
        try:
            yield policy
        finally:  # set_adapter also makes the trained adapter trainable again
            policy.set_adapter("default")
    elif hasattr(policy, "disable_adapter"):
        with policy.disable_adapter():
            yield policy
    else:
        raise ValueError("a KL penalty needs a reference: train with LoRA (the base is the reference) or pass one")


def build_reference(
    policy: torch.nn.Module, model: str, reference: str | None = None, *, dtype: str = "float32"
) -> torch.nn.Module | None:
    """The reference of an online method: a separate frozen model, or ``None`` when the policy itself serves.

    ``None`` for a LoRA policy (its adapter switched off, or — continuing an adapter folder such as an SFT result —
    a frozen ``ref`` copy of that adapter, loaded here). A named ``reference`` is loaded frozen; a full-weight
    policy without one gets a frozen copy of itself (twice the memory, said in the log).
    """
    if reference is None and hasattr(policy, "disable_adapter"):
        load_reference_adapter(policy, model)
        return None
    if reference is None:
        log.warning("no LoRA: keeping a frozen copy of the initial policy as the KL reference (twice the memory)")
        # a ZeRO-3 partition cannot be deep-copied; loading the same weights again is the same initial policy
        partitioned = any(hasattr(p, "ds_id") for p in policy.parameters())
        ref = load_model(model, dtype=dtype, trainable_adapter=False) if partitioned else copy.deepcopy(policy)
    else:
        ref = load_model(reference, dtype=dtype, trainable_adapter=False)
    return ref.requires_grad_(False).eval()
