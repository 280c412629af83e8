"""Frozen linear weights stored in bf16 under bf16-mixed: exact under autocast, restored exactly, skipped if unsafe."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from rlft.data import PreferenceDataModule
from rlft.methods import DPO, GRPO
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.lowp import (
    full_precision_linears,
    restore_linears,
    store_linears,
    stored_linears,
)

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
PAIRS = "rlft/assets/sample_pairs.jsonl"


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """``family -> folder``: the tiny model saved in bf16, as hub checkpoints are (its fp32 load is exact in bf16)."""
    made = {}

    def make(family: str) -> str:
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            load_model(family).to(torch.bfloat16).save_pretrained(path)
            load_tokenizer(family).save_pretrained(path)
            made[family] = str(path)
        return made[family]

    return make


def loss_and_grads(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma"])
def test_stored_weights_change_no_number_under_autocast_and_restore_exactly(bf16_checkpoint, family):
    model = load_model(bf16_checkpoint(family), lora=LORA).train()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, grads = loss_and_grads(model, ids)

    converted, skipped = store_linears(model)
    layers = stored_linears(model)
    assert converted == len(layers) and skipped == 0
    tied = model.config.tie_word_embeddings  # Gemma's head is its embedding: left alone, the residual stays fp32
    assert converted == 2 * 7 + (0 if tied else 1)
    assert all(layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad for layer in layers)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the adapter trains in fp32

    stored_logits, stored_grads = loss_and_grads(model, ids)
    assert torch.equal(stored_logits, logits)
    assert stored_grads.keys() == grads.keys()
    assert all(torch.equal(stored_grads[n], grads[n]) for n in grads)

    restore_linears(model)
    assert not stored_linears(model)
    assert all(torch.equal(p, original[n]) and p.dtype == original[n].dtype for n, p in model.named_parameters())
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)


def test_outside_autocast_a_stored_layer_multiplies_in_bf16_and_returns_fp32(bf16_checkpoint):
    model = load_model(bf16_checkpoint("tiny-llama"), lora=LORA).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        store_linears(model)
        stored = model(input_ids=ids).logits  # no autocast: each stored layer casts its input and output
        with full_precision_linears(model):
            again = model(input_ids=ids).logits
            assert not stored_linears(model)
    assert stored.dtype == torch.float32
    assert not torch.equal(stored, fp32)  # the products ran in bf16 ...
    torch.testing.assert_close(stored, fp32, atol=0.05, rtol=0.05)  # ... of the same weights
    assert torch.equal(again, fp32)  # full precision inside the context, exactly
    assert len(stored_linears(model)) == 15  # and stored again after it


def test_weights_bf16_would_round_trainable_and_tied_weights_stay(bf16_checkpoint):
    model = load_model("tiny-llama", lora=LORA)  # random fp32 init: not exact in bf16
    assert store_linears(model) == (0, 15)
    assert not stored_linears(model)
    full = load_model(bf16_checkpoint("tiny-llama"))  # no LoRA: every weight trains
    assert store_linears(full) == (0, 0)
    tied = load_model(bf16_checkpoint("tiny-gemma")).requires_grad_(False)
    store_linears(tied)
    assert tied.lm_head.weight.dtype == tied.get_input_embeddings().weight.dtype == torch.float32


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.stored: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))
        self.stored.append(len(stored_linears(pl_module)))


def fit(module, data, tmp_path, steps: int, precision: str = "bf16-mixed") -> Recorder:
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        precision=precision,
        callbacks=[recorder],
    )
    trainer.fit(module, data)
    return recorder


def test_bf16_mixed_dpo_trains_the_same_with_stored_weights_and_exports_the_loaded_base(bf16_checkpoint, tmp_path):
    path = bf16_checkpoint("tiny-llama")
    runs = {}
    for stored in (False, True):
        L.seed_everything(0)
        module = DPO(
            model=path,
            lora=LORA,
            optim={"lr": 1e-2},
            frozen_weights_bf16=stored,
            merge_on_save=True,
            output_dir=str(tmp_path / f"out{stored}"),
        )
        data = PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, shuffle=False, limit=12)
        runs[stored] = fit(module, data, tmp_path / f"run{stored}", steps=3)
        base = {n: p for n, p in module.model.named_parameters() if not p.requires_grad}
        assert all(p.dtype == torch.float32 for p in base.values())  # restored before the export
    assert runs[True].stored == [15, 15, 15] and runs[False].stored == [0, 0, 0]
    assert runs[True].losses == runs[False].losses  # exactly: autocast computed the same products
    assert runs[True].losses[-1] < runs[True].losses[0]
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(tmp_path / "outFalse" / name), load_file(tmp_path / "outTrue" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(tmp_path / "outTrue" / "merged/model.safetensors")["lm_head.weight"].dtype == torch.float32


def test_bf16_mixed_grpo_samples_the_same_through_the_twin_and_runs_without_it(bf16_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(8)))
    rewards = [{"source": "exact_match", "options": {"field": "answer", "extract": "last_number"}}]
    samples = {}
    for stored, decode_dtype in ((False, "bfloat16"), (True, "bfloat16"), (True, None)):
        L.seed_everything(0)
        module = GRPO(
            model=bf16_checkpoint("tiny-llama"),
            lora=LORA,
            rewards=rewards,
            group_size=2,
            sampling={"max_new_tokens": 6},
            decoder={"decode_dtype": decode_dtype},
            frozen_weights_bf16=stored,
            output_dir=str(tmp_path / "out"),
        )
        data = PreferenceDataModule(path=str(prompts), batch_size=2, val_fraction=0.0, shuffle=False)
        seen: list = []
        score = module.score
        module.score = lambda rollout, stage, score=score, seen=seen: (
            seen.append(rollout.completions),
            score(rollout, stage),
        )[1]
        recorder = fit(module, data, tmp_path / f"grpo{stored}{decode_dtype}", steps=2)
        assert recorder.stored == ([15, 15] if stored else [0, 0])
        samples[stored, decode_dtype] = seen
    # the twin is refreshed from the same values: the same samples, step after step
    assert samples[True, "bfloat16"] == samples[False, "bfloat16"]
    assert len(samples[True, None]) == 2  # sampling from the policy itself, products in bf16 via the hooks


class CrashingDPO(DPO):
    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            assert stored_linears(self), "the weights were not stored in bf16 while fitting"
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_crashed_fit_gives_the_loaded_weights_back(bf16_checkpoint, tmp_path):
    module = CrashingDPO(model=bf16_checkpoint("tiny-llama"), lora=LORA, optim={"lr": 1e-2})
    data = PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, limit=12)
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, data, tmp_path, steps=3)
    assert not stored_linears(module)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
