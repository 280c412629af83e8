"""PPO/GRPO continuing an SFT adapter: the KL reference is that adapter (frozen), not the raw base."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import GRPO, PPO, SFT
from rlft.models import LoraSettings
from rlft.models.reference import REF_ADAPTER, reference_model
from rlft.rl.logps import token_logps

LORA = LoraSettings(r=8, alpha=16, dropout=0.0)


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """An SFT adapter trained hard enough that base and base + adapter clearly differ."""
    tmp_path = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    sft = SFT("tiny-llama", lora=LORA, optim={"lr": 5e-3}, output_dir=str(tmp_path / "hf"))
    data = PreferenceDataModule(path="rlft/assets/sample_sft.jsonl", batch_size=4, max_length=96, val_fraction=0.0)
    _trainer(tmp_path, 6).fit(sft, data)
    return str(tmp_path / "hf")


@pytest.mark.parametrize("method", [GRPO, PPO])
def test_reference_is_the_frozen_sft_adapter(tmp_path, sft_folder, method):
    L.seed_everything(0)
    extra = {"group_size": 2, "kl": {"coef": 0.1}} if method is GRPO else {"kl": {"coef": 0.1}}
    module = method(
        model=sft_folder,
        lora=LORA,
        optim={"lr": 0.0},
        sampling={"max_new_tokens": 6},
        rewards=[{"source": "length", "options": {"target": 24, "unit": "chars"}}],
        output_dir=str(tmp_path / "out"),
        **extra,
    )
    assert REF_ADAPTER in module.model.peft_config
    ids = torch.tensor([[5, 17, 33, 48, 61, 70, 82, 95]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        policy = token_logps(module.model, ids, mask, 4)[0]
        with reference_model(module.model) as ref:
            reference = token_logps(ref, ids, mask, 4)[0]
        with module.model.disable_adapter():
            base = token_logps(module.model, ids, mask, 4)[0]
    torch.testing.assert_close(reference, policy)  # the policy starts as the SFT model, and so does the reference
    assert (base - policy).abs().max() > 1e-2  # the raw base would be a different reference
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    data = PreferenceDataModule(path="rlft/assets/sample_prompts.jsonl", batch_size=2, val_fraction=0.0, seed=0)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, data)
    metrics = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
    assert metrics["train/kl"].dropna().abs().max() < 1e-5  # lr 0: the policy never leaves the reference
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trainable
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and not (out / REF_ADAPTER).exists()
