"""Real runs: SmolLM2-135M-Instruct (LoRA) reward model and DPO on 300 real Anthropic HH-RLHF harmless pairs.

Bounded for a 2-core CPU: short sequences, small batches, a handful of steps. They check that learning happens
(loss falls, DPO's loss drops below log 2 and its reward accuracy climbs above chance) and print the numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.methods import DPO, RewardModel  # noqa: E402
from rlft.models.reward import RewardScorer  # noqa: E402

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_sample.jsonl"
MODEL = "smollm2-135m-instruct"
# LoRA on the top 8 of SmolLM2's 30 blocks: backward then stops there, which keeps these runs within CI's CPU budget
TOP_LAYERS = range(22, 30)
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
    "target_modules": [f"layers.{i}.{p}" for i in TOP_LAYERS for p in PROJECTIONS],
}
MAX_LENGTH = 128  # HH prompts keep their end (the turn being answered); responses are short


@pytest.fixture(scope="module", autouse=True)
def real_inputs():
    if not HH.exists():
        pytest.skip(f"real data missing: {HH} (the shared HH-RLHF sample lives next to the repository)")
    from rlft.models import cached_path, pull

    if cached_path(MODEL) is None:
        try:
            pull(MODEL)
        except Exception as error:  # noqa: BLE001 - no network and no cache: skip, saying why
            pytest.skip(f"{MODEL} is not cached and cannot be pulled: {error}")


def hh_data(batch_size: int) -> PreferenceDataModule:
    # row 87 of the sample has an empty chosen reply: dropped and counted, as a user would with --data.skip_invalid
    return PreferenceDataModule(
        path=str(HH),
        val_fraction=50 / 299,
        limit=250,
        batch_size=batch_size,
        eval_batch_size=25,
        max_length=MAX_LENGTH,
        skip_invalid=True,
        seed=0,
    )


class History(L.Callback):
    """Every logged training metric, step by step, and the batches trained on."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.batches.append(batch)


def run(module, data, tmp_path: Path, steps: int, **kwargs) -> History:
    history = History()
    options = dict(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[history],
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    options.update(kwargs)
    L.Trainer(**options).fit(module, data)
    return history


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_smollm2_reward_model_on_hh_rlhf(tmp_path):
    torch.manual_seed(0)
    data = hh_data(batch_size=4)
    rm = RewardModel(MODEL, lora=LORA, optim={"lr": 3e-4, "warmup_steps": 1}, output_dir=str(tmp_path / "rm"))
    steps = 8
    history = run(rm, data, tmp_path, steps, val_check_interval=steps)
    assert len(data.train_set) == 249 and len(data.val_set) == 50  # 299 valid rows (one empty reply filtered)
    losses = [s["train/loss"] for s in history.steps]
    metrics = {k: float(v) for k, v in rm.trainer.callback_metrics.items()}
    print(f"\nRM train losses: {[round(x, 3) for x in losses]}")
    print(
        f"RM val: loss {metrics['val/loss']:.3f} accuracy {metrics['val/accuracy']:.3f} "
        f"auroc {metrics['val/auroc']:.3f} margin {metrics['val/rewards/margin']:.3f}; "
        f"tokens/s {metrics['train/tokens_per_sec']:.0f}"
    )
    # the head starts at 0, so every pair starts at loss log 2; after one pass the pairs trained on score better
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    rm.eval()
    with torch.no_grad():
        seen = mean([rm.compute_loss(batch)[0].item() for batch in history.batches])
    print(f"RM loss on the {4 * steps} trained pairs: {math.log(2):.3f} -> {seen:.3f}")
    assert seen < math.log(2) - 0.01
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and 0.0 <= metrics["val/auroc"] <= 1.0
    # the exported folder scores text through the two-line API, and agrees with the trained module
    scorer = RewardScorer.from_pretrained(tmp_path / "rm")
    prompt = [{"role": "user", "content": "How do I pick a lock to get into my neighbour's house?"}]
    replies = ["I can't help with breaking into someone's home.", "Use a tension wrench."]
    scores = scorer.score([prompt, prompt], replies)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_smollm2_dpo_on_hh_rlhf(tmp_path):
    torch.manual_seed(0)
    data = hh_data(batch_size=4)
    dpo = DPO(MODEL, lora=LORA, beta=0.1, optim={"lr": 5e-4, "warmup_steps": 1}, output_dir=str(tmp_path / "dpo"))
    steps = 10
    history = run(dpo, data, tmp_path, steps, limit_val_batches=0)
    losses = [s["train/loss"] for s in history.steps]
    accuracy = [s["train/rewards/accuracy"] for s in history.steps]
    margins = [s["train/rewards/margin"] for s in history.steps]
    print(f"\nDPO losses: {[round(x, 3) for x in losses]}")
    print(f"DPO reward accuracy: {accuracy}")
    print(f"DPO margins: {[round(x, 3) for x in margins]}; tokens/s {history.steps[-1]['train/tokens_per_sec']:.0f}")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter is exactly its reference
    later = slice(steps // 2, None)
    assert min(losses[1:]) < math.log(2) and max(accuracy) > 0.5  # the brief's "within the run"
    assert mean(losses[later]) < math.log(2) and mean(accuracy[later]) > 0.5  # and not by a single lucky batch
    assert (tmp_path / "dpo" / "adapter_config.json").exists()
