"""DPO: concatenated log-probs vs TRL, the three reference modes, the SFT -> DPO pipeline.

Its options, subclassing, bad input and per-row fields: test_dpo_options.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.methods import DPO, SFT  # noqa: E402
from rlft.methods.precomputed import CACHE_FILE  # noqa: E402
from rlft.models import load_model, load_tokenizer  # noqa: E402
from rlft.models.reference import REF_ADAPTER  # noqa: E402
from rlft.models.scoring import pair_logps  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PAIRS = str(REPO / "rlft" / "assets" / "sample_pairs.jsonl")
SFT_DATA = str(REPO / "rlft" / "assets" / "sample_sft.jsonl")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two oversubscribed ones on this shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pairs_batch(model: str, n: int = 6, max_length: int = 96) -> dict:
    data = PreferenceDataModule(path=PAIRS, max_length=max_length, val_fraction=0.0)
    data.attach("pairs", load_tokenizer(model)).setup()
    return Collator("pairs", data.tokenizer.pad_token_id)(data.train_set[:n])


def trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def reference_logps_by_hand(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log_softmax(logits)[label] over response tokens, side by side, with plain torch ops."""
    out = []
    for side in ("chosen", "rejected"):
        with torch.no_grad():
            logits = model(input_ids=batch.side(side).input_ids, attention_mask=batch.side(side).attention_mask).logits
        labels = batch.side(side).labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((token * (labels != -100)).sum(-1).float())
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- TRL parity
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_concatenated_logps_match_trl_dpo_forward(family):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    data = PreferenceDataModule(path=PAIRS, max_length=96, val_fraction=0.0)
    data.attach("pairs", load_tokenizer(family)).setup()
    examples = data.train_set[:5]
    ours_batch = Collator("pairs", data.tokenizer.pad_token_id)(examples)
    model = load_model(family).eval()
    with torch.no_grad():
        ours = pair_logps(model, ours_batch)

    # TRL's own collator and fused-head forward (DPOTrainer._compute_loss) on the same token ids
    trl_batch = DataCollatorForPreference(pad_token_id=data.tokenizer.pad_token_id).torch_call(
        [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples]
    )
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    ours_labels = ours_batch.sequences.labels
    if family == "tiny-llama":  # Llama-3 template: the whole response is trained, so the masks agree exactly
        width = ours_labels.shape[1]
        assert torch.equal(labels[:, :width], ours_labels) and (labels[:, width:] == -100).all()
    else:  # ChatML leaves a "\n" after <|im_end|> untrained in rlft; score TRL on rlft's labels
        labels = torch.nn.functional.pad(ours_labels, (0, labels.shape[1] - ours_labels.shape[1]), value=-100)
    trl_model = load_model(family).eval()
    trl_utils.add_fused_lm_head(trl_model)
    with torch.no_grad():
        trl_out = trl_model(
            input_ids=trl_batch["input_ids"],
            attention_mask=trl_batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        )
    trl_chosen, trl_rejected = trl_out.log_probs.sum(dim=1).chunk(2)
    torch.testing.assert_close(ours.chosen, trl_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.rejected, trl_rejected, atol=1e-5, rtol=0)
    # and both agree with a plain log_softmax in float64
    by_hand = reference_logps_by_hand(model, ours_batch)
    torch.testing.assert_close(ours.chosen, by_hand[0], atol=1e-4, rtol=0)


def test_pair_logps_gradients_match_full_logits_path():
    batch = pairs_batch("tiny-llama", n=3)
    model = load_model("tiny-llama")
    logps = pair_logps(model, batch)
    (logps.chosen - logps.rejected).sum().backward()
    fast = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    chosen, rejected = [], []
    for side, out in (("chosen", chosen), ("rejected", rejected)):
        logits = model(input_ids=batch.side(side).input_ids, attention_mask=batch.side(side).attention_mask).logits
        labels = batch.side(side).labels[:, 1:]
        token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((token * (labels != -100)).sum(-1))
    (chosen[0] - rejected[0]).sum().backward()
    torch.testing.assert_close(fast, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(logps.chosen_tokens, (batch.side("chosen").labels[:, 1:] != -100).sum(-1))


def test_gradient_checkpointing_with_lora_keeps_loss_and_gradients():
    batch = pairs_batch("tiny-llama", n=3)
    losses, grads = [], []
    for checkpointing in (False, True, "selective"):
        torch.manual_seed(0)
        dpo = DPO("tiny-llama", lora=LORA, gradient_checkpointing=checkpointing).train()
        with torch.no_grad():
            for name, p in dpo.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        loss, _ = dpo.compute_loss(batch)
        loss.backward()  # the "element 0 of tensors does not require grad" failure would raise here
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for n, p in dpo.model.named_parameters() if "lora_A" in n]))
    for loss, grad in zip(losses[1:], grads[1:]):
        assert loss == pytest.approx(losses[0], abs=1e-6)
        torch.testing.assert_close(grad, grads[0], atol=1e-6, rtol=1e-4)
        assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- reference modes
def test_adapter_reference_is_the_base_without_a_second_copy():
    batch = pairs_batch("tiny-llama")
    dpo = DPO("tiny-llama", lora=LORA)
    dpo.configure_model()  # what Trainer.fit calls: the network is built there (lazily on first `.model` otherwise)
    assert dpo.reference_mode == "adapter" and dpo.ref_model is None
    base_params = sum(p.numel() for p in load_model("tiny-llama").parameters())
    lora_params = sum(p.numel() for p in dpo.parameters() if p.requires_grad)
    assert sum(p.numel() for p in dpo.parameters()) == base_params + lora_params  # no frozen copy anywhere
    # make the adapter non-trivial so policy and reference differ
    with torch.no_grad():
        for name, p in dpo.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    reference = dpo.reference_logps(batch)  # the policy's type: sums and token counts
    ref_chosen, ref_rejected = reference.chosen, reference.rejected
    torch.testing.assert_close(reference.chosen_tokens, dpo.policy_logps(batch).chosen_tokens)
    expected = reference_logps_by_hand(load_model("tiny-llama"), batch)
    torch.testing.assert_close(ref_chosen, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_rejected, expected[1], atol=1e-4, rtol=0)
    assert not torch.allclose(dpo.policy_logps(batch).chosen, ref_chosen, atol=1e-3)
    assert all(p.requires_grad for n, p in dpo.model.named_parameters() if "lora_" in n)


def test_separate_reference_model_any_model_string():
    batch = pairs_batch("tiny-llama")
    dpo = DPO("tiny-llama", lora=None)  # no LoRA: a separate frozen copy is the default
    dpo.configure_model()  # the network and its reference are built here (Trainer.fit calls it)
    assert dpo.reference_mode == "model" and dpo.ref_model is not None
    assert not any(p.requires_grad for p in dpo.ref_model.parameters())
    loss, metrics = dpo.compute_loss(batch)
    assert dpo.configure_optimizers  # frozen reference weights never reach the optimiser:
    trained = {id(p) for p in dpo.parameters() if p.requires_grad}
    assert not trained & {id(p) for p in dpo.ref_model.parameters()}
    # policy == reference at initialisation: every log-ratio is 0 and the sigmoid loss is exactly log 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        DPO("tiny-llama", lora=None, reference="adapter")
    # any model string: a LoRA policy on tiny-llama with a tiny-mistral reference (same tokenizer)
    other = DPO("tiny-llama", lora=LORA, reference="model", ref_model="tiny-mistral")
    expected = reference_logps_by_hand(load_model("tiny-mistral"), batch)
    torch.testing.assert_close(other.reference_logps(batch).chosen, expected[0], atol=1e-4, rtol=0)


def test_precomputed_reference_is_cached_and_reused_on_resume_and_across_epochs(tmp_path, monkeypatch):
    def data():
        return PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.2, limit=16, val_limit=3)

    ckpt_dir = tmp_path / "checkpoints"
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=2)
    dpo = DPO("tiny-llama", lora=LORA, reference="precomputed", optim={"lr": 1e-3})
    trainer(
        tmp_path, 3, enable_checkpointing=True, callbacks=[callback], limit_val_batches=None, val_check_interval=2
    ).fit(dpo, data())
    cache_file = ckpt_dir / CACHE_FILE
    stored = torch.load(cache_file, weights_only=False)
    assert len(stored["logps"]) == 16 + 3  # every train and validation pair
    # the cached values are the adapter-disabled base's log-probs
    batch = pairs_batch("tiny-llama", n=16)
    keys = __import__("rlft.models.scoring", fromlist=["batch_keys"]).batch_keys(batch)
    cached = torch.tensor([stored["logps"][k][:2] for k in keys if k in stored["logps"]])  # (sums, token counts)
    expected = torch.stack(reference_logps_by_hand(load_model("tiny-llama"), batch), -1)
    known = [i for i, k in enumerate(keys) if k in stored["logps"]]
    assert len(known) >= 10
    torch.testing.assert_close(cached, expected[known], atol=1e-4, rtol=0)

    # resume for two more epochs: nothing is recomputed and no live reference forward happens
    calls = []
    monkeypatch.setattr(
        DPO,
        "live_reference_logps",
        lambda self, batch: calls.append(1) or (_ for _ in ()).throw(AssertionError("live reference used")),
    )
    mtime = cache_file.stat().st_mtime_ns
    resumed = DPO("tiny-llama", lora=LORA, reference="precomputed", optim={"lr": 1e-3})
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=2)
    trainer(
        tmp_path,
        12,
        max_epochs=3,
        enable_checkpointing=True,
        callbacks=[callback],
        limit_val_batches=None,
        val_check_interval=2,
    ).fit(resumed, data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.trainer.current_epoch >= 2 and not calls
    assert cache_file.stat().st_mtime_ns == mtime
    # `validate` without `fit` loads the same cache
    fresh = DPO("tiny-llama", lora=LORA, reference="precomputed")
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir))
    metrics = trainer(tmp_path, 1, enable_checkpointing=True, callbacks=[callback], limit_val_batches=None).validate(
        fresh, data(), verbose=False
    )
    assert not calls and metrics[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_precomputed_full_finetune_refuses_to_use_trained_policy_on_resume(tmp_path):
    dpo = DPO("tiny-llama", lora=None, reference="precomputed", ref_cache_path=str(tmp_path / "ref.pt"))

    class FakeTrainer:
        ckpt_path = str(tmp_path / "last.ckpt")

    dpo._trainer = FakeTrainer()  # what Lightning sets while fitting
    with pytest.raises(RuntimeError, match="no longer the reference"):
        dpo.precomputed._check_can_compute(tmp_path / "ref.pt", 3)


# ---------------------------------------------------------------------------------------------- pipeline
def test_sft_adapter_then_dpo_from_its_folder(tmp_path):
    sft = SFT("tiny-llama", lora=LORA, optim={"lr": 5e-3}, output_dir=str(tmp_path / "sft"))
    sft_data = PreferenceDataModule(path=SFT_DATA, batch_size=4, max_length=96, val_fraction=0.0)
    trainer(tmp_path, 4).fit(sft, sft_data)
    sft_folder = tmp_path / "sft"
    assert (sft_folder / "adapter_config.json").exists()

    dpo = DPO(str(sft_folder), lora=LORA, optim={"lr": 1e-3}, output_dir=str(tmp_path / "dpo"))
    assert REF_ADAPTER in dpo.model.peft_config  # the SFT adapter, frozen, is the reference
    batch = pairs_batch("tiny-llama")
    sft_model = load_model(str(sft_folder), trainable_adapter=False).eval()
    expected = reference_logps_by_hand(sft_model, batch)
    ref_chosen = dpo.reference_logps(batch).chosen
    torch.testing.assert_close(ref_chosen, expected[0], atol=1e-4, rtol=0)
    loss, _ = dpo.compute_loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy starts as the SFT model
    trained = {n for n, p in dpo.model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)

    trainer(tmp_path, 4).fit(dpo, PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0))
    assert {n for n, p in dpo.model.named_parameters() if p.requires_grad} == trained  # ref stayed frozen
    ref_after = dpo.reference_logps(batch).chosen
    torch.testing.assert_close(ref_after, expected[0], atol=1e-4, rtol=0)
    out = tmp_path / "dpo"
    assert (out / "adapter_config.json").exists() and not (out / REF_ADAPTER).exists()
    exported = load_model(str(out), trainable_adapter=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            pair_logps(exported, batch).chosen, dpo.policy_logps(batch).chosen, atol=1e-4, rtol=0
        )
