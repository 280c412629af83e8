"""Real model, real data: LoRA SFT of SmolLM2-135M-Instruct on the Alpaca seed tasks (a few CPU steps)."""

from __future__ import annotations

import lightning as L
import peft
import pytest
import torch
import transformers

from rlft.data import PreferenceDataModule
from rlft.methods import SFT, OptimizerSettings
from rlft.models import LoraSettings, cached_path

pytestmark = pytest.mark.real


def test_smollm2_lora_sft_lowers_val_loss_and_exports(smollm2, shared_data, tmp_path):
    L.seed_everything(0)
    module = SFT(
        model=smollm2,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0),
        optim=OptimizerSettings(lr=2e-3, warmup_steps=1, scheduler="constant_with_warmup"),
        output_dir=str(tmp_path / "hf"),
    )
    data = PreferenceDataModule(
        path=str(shared_data / "alpaca_seed_tasks.jsonl"),
        batch_size=4,
        max_length=160,
        val_fraction=0.1,
        limit=32,
        val_limit=8,
        seed=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1.0,
        val_check_interval=8,
    )
    before = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    after = trainer.callback_metrics["val/loss"].item()
    print(
        f"SmolLM2 SFT val/loss {before:.4f} -> {after:.4f}, "
        f"tokens/s {trainer.callback_metrics['train/tokens_per_sec'].item():.0f}"
    )
    assert after < before - 0.05

    base = transformers.AutoModelForCausalLM.from_pretrained(str(cached_path(smollm2)))
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit."}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip(), "the reloaded adapter generated nothing"
