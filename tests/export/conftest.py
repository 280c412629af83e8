"""Shared fixtures: tiny models of each exportable family with a LoRA adapter SFT-trained a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
SFT_DATA = str(Path(__file__).resolve().parents[2] / "rlft" / "assets" / "sample_sft.jsonl")


def train_adapter(
    model: str,
    folder: Path,
    *,
    steps: int = 4,
    lr: float = 5e-2,
    batch_size: int = 4,
    max_length: int = 128,
    data: str = SFT_DATA,
    limit: int | None = None,
) -> tuple[Path, Path]:
    """LoRA-SFT ``model`` for ``steps`` steps; returns ``(adapter folder, .ckpt file)``."""
    import lightning as L

    from rlft.data import PreferenceDataModule
    from rlft.methods import SFT, OptimizerSettings
    from rlft.models import LoraSettings

    L.seed_everything(0)
    module = SFT(
        model=model,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        optim=OptimizerSettings(lr=lr, warmup_steps=0),
        output_dir=str(folder / "hf_model"),
    )
    datamodule = PreferenceDataModule(
        path=data, batch_size=batch_size, max_length=max_length, val_fraction=0.1, limit=limit, seed=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule)
    checkpoint = folder / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return folder / "hf_model", checkpoint


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """``tiny_adapter(family) -> (adapter folder, .ckpt)``, trained once per session and family."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            made[family] = train_adapter(f"tiny-{family}", tmp_path_factory.mktemp(f"sft-{family}"))
        return made[family]

    return get


def reference_logits(model_string: str, ids: list[list[int]]):
    """PyTorch logits of any model string (adapters applied, unmerged), fp32 on CPU."""
    import torch

    from rlft.models import load_model

    network = load_model(model_string, trainable_adapter=False).eval()
    with torch.no_grad():
        return network(torch.tensor(ids)).logits.numpy()
