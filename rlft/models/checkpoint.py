"""Use an rlft Lightning checkpoint (``*.ckpt``) as a model string.

rlft checkpoints hold only the trainable weights plus the hyperparameters that say how the base was built, so the
model is rebuilt from its original model string and LoRA settings, then the trained weights are loaded on top.
"""

from __future__ import annotations

from pathlib import Path

import torch


def is_checkpoint(model: str) -> bool:
    return model.endswith(".ckpt")


def checkpoint_hparams(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise ValueError(f"{path}: not an rlft checkpoint (no 'model' in its hyper_parameters)")
    return dict(hparams)


def load_checkpoint_model(path: str, **overrides) -> torch.nn.Module:
    """Rebuild the policy network stored in an rlft checkpoint (LoRA left unmerged)."""
    from rlft.models.loading import LoraSettings, load_model

    hparams = checkpoint_hparams(path)
    lora = hparams.get("lora")
    lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
    model = load_model(hparams["model"], dtype=overrides.pop("dtype", hparams.get("dtype", "float32")), lora=lora)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing_trained = set(weights) - set(model.state_dict())
    if missing_trained:
        raise ValueError(f"{path}: {len(missing_trained)} trained tensors do not fit the rebuilt model, e.g. "
                         f"{sorted(missing_trained)[:3]}")  # fmt: skip
    model.load_state_dict(weights, strict=False)
    return model
