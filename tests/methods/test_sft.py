"""SFT end to end on tiny models: it learns, resumes exactly, and exports a folder plain peft can use."""

from __future__ import annotations

import math

import lightning as L
import peft
import pytest
import torch
import transformers

from rlft.data import PreferenceDataModule
from rlft.methods import SFT, OptimizerSettings
from rlft.models import LoraSettings, load_tokenizer, pull

SFT_DATA = "rlft/assets/sample_sft.jsonl"


class LossRecorder(L.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _trainer(tmp_path, max_steps, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kwargs,
    )


def _module(tmp_path, lr=1e-3, **kwargs) -> SFT:
    return SFT(
        model="tiny-llama",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        optim=OptimizerSettings(lr=lr, warmup_steps=2),
        output_dir=str(tmp_path / "hf"),
        **kwargs,
    )


def test_sft_overfits_a_small_batch(tmp_path):
    L.seed_everything(0)
    module = SFT(model="tiny-llama", lora=None, optim=OptimizerSettings(lr=1e-2, scheduler="constant"))
    data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=128, val_fraction=0.0, limit=4)
    recorder = LossRecorder()
    _trainer(tmp_path, 30, [recorder], enable_checkpointing=False).fit(module, data)
    first, last = recorder.losses[1], recorder.losses[30]
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_resume_from_last_gives_the_same_steps_and_losses(tmp_path):
    def run(root, stop_at=None, ckpt_path=None):
        L.seed_everything(0)
        module = SFT(model="tiny-gpt2", lora=LoraSettings(r=4, dropout=0.1), optim=OptimizerSettings(lr=1e-3))
        data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.0)
        recorder = LossRecorder(stop_at)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
        trainer = _trainer(root, 24, [recorder, checkpoint])
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return recorder.losses, trainer

    full, _ = run(tmp_path / "a")  # 24 steps cross an epoch boundary (16 batches per epoch)
    first, _ = run(tmp_path / "b", stop_at=10)
    resumed, trainer = run(tmp_path / "b", ckpt_path="last")
    assert sorted(first) == list(range(1, 11)) and sorted(resumed) == list(range(11, 25))
    assert trainer.global_step == 24
    for step in range(1, 25):
        got = first.get(step, resumed.get(step))
        assert got == pytest.approx(full[step], abs=1e-6), f"step {step}: {got} != {full[step]}"


def test_export_reloads_with_plain_transformers_and_peft(tmp_path):
    module = _module(tmp_path)
    data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.25)
    _trainer(tmp_path, 3, enable_checkpointing=False).fit(module, data)
    out = tmp_path / "hf"
    assert (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(pull("tiny-llama")))
    reloaded = peft.PeftModel.from_pretrained(base, out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == load_tokenizer("tiny-llama").chat_template
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)
    generated = reloaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_merged_export_matches_adapter(tmp_path):
    module = _module(tmp_path, merge_on_save=True)
    data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.0)
    _trainer(tmp_path, 3, enable_checkpointing=False).fit(module, data)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)


def test_validation_logs_token_weighted_loss_and_perplexity(tmp_path):
    module = _module(tmp_path)
    data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.25)
    trainer = _trainer(tmp_path, 2, enable_checkpointing=False, val_check_interval=2)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert torch.isclose(metrics["val/perplexity"], metrics["val/loss"].exp())
    # independent check: token-weighted NLL over the validation set
    module.eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = module.model(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits
            labels = batch.tokens.labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
            nll += float(losses)
            tokens += float((labels != -100).sum())
    assert float(metrics["val/loss"]) == pytest.approx(nll / tokens, rel=1e-4)
    assert float(trainer.callback_metrics["train/tokens_per_sec"]) > 0


class DoubledSFT(SFT):
    """Overrides compute_loss only: validation must report what it returns."""

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        return 2 * loss, metrics


def test_validation_runs_through_compute_loss(tmp_path):
    data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.25)
    # LoRA's B starts at 0: both modules compute the base model, whatever the adapter's random A
    plain, doubled = (
        _trainer(tmp_path, 1, enable_checkpointing=False).validate(
            cls(model="tiny-llama", lora={"r": 4}), data, verbose=False
        )[0]
        for cls in (SFT, DoubledSFT)
    )
    assert doubled["val/loss"] == pytest.approx(2 * plain["val/loss"], rel=1e-6)
    assert doubled["val/perplexity"] == pytest.approx(math.exp(doubled["val/loss"]), rel=1e-5)
