"""Read an rlft Lightning checkpoint (``*.ckpt``): its hyperparameters and trained weights (nothing is built here).

rlft checkpoints hold only the trainable weights plus the hyperparameters that say how the base was built, so
:func:`rlft.models.loading.load_checkpoint_model` rebuilds the model from its original model string and LoRA
settings, then loads the trained weights on top.
"""

from __future__ import annotations

from pathlib import Path

import torch


def is_checkpoint(model: str) -> bool:
    return model.endswith(".ckpt")


def _load(path: str, **options) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, **options)
    except Exception as error:  # noqa: BLE001 - torch raises OSError/RuntimeError/pickle errors for a bad file
        size = Path(path).stat().st_size
        raise ValueError(f"{path}: not a readable checkpoint ({size} bytes; truncated or not a .ckpt?)") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_hparams(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = _load(path, mmap=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise ValueError(f"{path}: not an rlft checkpoint (no 'model' in its hyper_parameters)")
    return dict(hparams)


def trained_weights(path: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The trainable tensors a checkpoint stores under ``prefix`` (prefix removed)."""
    state = _load(path)["state_dict"]
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
