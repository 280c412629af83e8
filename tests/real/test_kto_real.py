"""Real run: LoRA KTO of SmolLM2-135M-Instruct on unpaired feedback built from real Anthropic HH-RLHF harmless pairs
(each chosen reply a desirable row, each rejected reply an undesirable one).

Bounded for a 2-core CPU: 12 rows, short sequences, LoRA on the top blocks, two passes of 3 steps. It checks that
the loss is finite and starts at KTO's hand value, and that in the second pass the desirable rows (all trained on
once) carry a higher implicit reward than the undesirable ones, and prints the numbers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.formats import convert  # noqa: E402
from rlft.data.sources import read_rows  # noqa: E402
from rlft.methods import KTO  # noqa: E402

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_sample.jsonl"
MODEL = "smollm2-135m-instruct"
PAIRS = 6  # -> 12 unpaired rows
BATCH = 4
# LoRA on the top 8 of SmolLM2's 30 blocks, as the other real preference runs: backward stops there
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": [f"layers.{i}.{p}" for i in range(22, 30) for p in PROJECTIONS],
}


@pytest.fixture(scope="module")
def hh_unpaired(tmp_path_factory) -> Path:
    if not HH.exists():
        pytest.skip(f"real data missing: {HH} (the shared HH-RLHF sample lives next to the repository)")
    from rlft.models import cached_path, pull

    if cached_path(MODEL) is None:
        try:
            pull(MODEL)
        except Exception as error:  # noqa: BLE001 - no network and no cache: skip, saying why
            pytest.skip(f"{MODEL} is not cached and cannot be pulled: {error}")
    pairs, _ = convert(read_rows(str(HH))[:PAIRS], kind="pairs", format="hh_rlhf", on_invalid="skip")
    path = tmp_path_factory.mktemp("kto") / "hh_unpaired.jsonl"
    with open(path, "w") as f:
        for pair in pairs:  # conversational prompts (message lists), TRL's KTO format
            f.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}) + "\n")
            f.write(json.dumps({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}) + "\n")
    return path


class RecordingKTO(KTO):
    """KTO that keeps each step's per-row implicit rewards and labels (through the loss hook a subclass overrides)."""

    def on_model_built(self) -> None:
        super().on_model_built()
        self.records: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def unpaired_loss(self, policy, reference, kl, batch):
        output = super().unpaired_loss(policy, reference, kl, batch)
        self.records.append((output.stats["rewards"].detach(), batch.label, float(output.losses.mean())))
        return output


def test_smollm2_kto_on_hh_rlhf_feedback(hh_unpaired, tmp_path):
    torch.manual_seed(0)
    data = PreferenceDataModule(
        path=str(hh_unpaired), val_fraction=0.0, batch_size=BATCH, max_length=96, seed=0, cache=False
    )
    optim = {"lr": 1e-3, "scheduler": "constant"}  # no warmup: every one of the few steps updates
    kto = RecordingKTO(MODEL, lora=LORA, beta=0.1, optim=optim, output_dir=str(tmp_path / "kto"))
    per_epoch = 2 * PAIRS // BATCH
    trainer = L.Trainer(
        max_steps=2 * per_epoch,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    started = time.perf_counter()
    trainer.fit(kto, data)
    elapsed = time.perf_counter() - started
    losses = [loss for _, _, loss in kto.records]
    # the second epoch measures every training row (before that step's update) after one pass over all of them
    rewards = torch.cat([r for r, _, _ in kto.records[per_epoch:]])
    labels = torch.cat([lab for _, lab, _ in kto.records[per_epoch:]])
    first = torch.cat([r for r, _, _ in kto.records[:per_epoch]])
    first_labels = torch.cat([lab for _, lab, _ in kto.records[:per_epoch]])
    desirable, undesirable = float(rewards[labels].mean()), float(rewards[~labels].mean())
    print(f"\nKTO losses: {[round(x, 4) for x in losses]} ({elapsed:.0f} s for {len(losses)} steps)")
    print(
        f"rewards of the {len(data.train_set)} training rows, epoch 1 (unseen): desirable "
        f"{float(first[first_labels].mean()):.4f}, undesirable {float(first[~first_labels].mean()):.4f}; "
        f"epoch 2: desirable {desirable:.4f}, undesirable {undesirable:.4f}"
    )
    assert len(data.train_set) == 2 * PAIRS and len(labels) == 2 * PAIRS and int(labels.sum()) == PAIRS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # a fresh adapter is exactly its reference
    assert desirable > undesirable
    assert (tmp_path / "kto" / "adapter_config.json").exists()
