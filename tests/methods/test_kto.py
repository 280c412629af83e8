"""KTO: the hand value at step 0, learning on a fixed batch, the reference choices, the loss hook, and
`rlft fit -c configs/kto/tiny.yaml` through the CLI with validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.methods import KTO  # noqa: E402
from rlft.models import load_tokenizer  # noqa: E402
from rlft.outputs import LossOutput  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = str(REPO / "rlft" / "assets" / "sample_unpaired.jsonl")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two oversubscribed ones on this shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unpaired_batch(n: int = 8) -> dict:
    data = PreferenceDataModule(path=DATA, max_length=96, val_fraction=0.0, shuffle=False)
    data.attach("unpaired", load_tokenizer("tiny-llama")).setup()
    return Collator("unpaired", data.tokenizer.pad_token_id)(data.train_set[:n])


def test_step_zero_loss_is_the_hand_value():
    # a fresh adapter is exactly its reference: every log-ratio and the KL point are 0, so each row's loss is
    # 1 - sigmoid(0) = 0.5, times its weight
    torch.manual_seed(0)
    batch = unpaired_batch()
    assert batch.label.any() and (~batch.label).any()
    kto = KTO("tiny-llama", lora=LORA, desirable_weight=1.0, undesirable_weight=1.0)
    with torch.no_grad():
        loss, metrics = kto.compute_loss(batch)
    assert float(loss) == pytest.approx(0.5, abs=1e-6)
    assert float(metrics["kl"]) == 0.0
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["logps/chosen"]) < 0 and float(metrics["logps/rejected"]) < 0
    weighted = KTO("tiny-llama", lora=LORA, desirable_weight=2.0, undesirable_weight=0.5)
    with torch.no_grad():
        loss, _ = weighted.compute_loss(batch)
    desirable = int(batch.label.sum())
    expected = 0.5 * (2.0 * desirable + 0.5 * (len(batch.label) - desirable)) / len(batch.label)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_separate_reference_model_starts_at_the_hand_value_too():
    torch.manual_seed(0)
    kto = KTO("tiny-llama", lora=None, reference="model")
    with torch.no_grad():
        loss, metrics = kto.compute_loss(unpaired_batch(4))
    assert kto.ref_model is not None and not any(p.requires_grad for p in kto.ref_model.parameters())
    assert float(loss) == pytest.approx(0.5, abs=1e-6) and float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="reference: adapter needs a LoRA policy"):
        KTO("tiny-llama", lora=None, reference="adapter")


def test_loss_falls_and_desirable_rewards_rise_above_undesirable_on_a_fixed_batch():
    torch.manual_seed(0)
    batch = unpaired_batch()
    kto = KTO("tiny-llama", lora=LORA)
    kto.configure_model()  # the network is built lazily
    kto.train()
    optimizer = torch.optim.AdamW([p for p in kto.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(25):
        loss, metrics = kto.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((float(loss.detach()), float(metrics["rewards/chosen"]), float(metrics["rewards/rejected"])))
    print(
        f"\nKTO fixed batch: loss {history[0][0]:.4f} -> {history[-1][0]:.4f}; rewards chosen "
        f"{history[-1][1]:.3f} rejected {history[-1][2]:.3f}"
    )
    assert history[0][0] == pytest.approx(0.5, abs=1e-6)
    assert history[-1][0] < 0.5 - 0.02
    assert history[-1][1] > 0 > history[-1][2]


def test_unpaired_loss_hook_is_what_a_subclass_overrides():
    class DesirableOnly(KTO):
        def unpaired_loss(self, policy, reference, kl, batch) -> LossOutput:
            output = super().unpaired_loss(policy, reference, kl, batch)
            return LossOutput(output.losses * batch.label, output.stats)

    torch.manual_seed(0)
    batch = unpaired_batch()
    with torch.no_grad():
        loss, _ = DesirableOnly("tiny-llama", lora=LORA).compute_loss(batch)
    assert float(loss) == pytest.approx(0.5 * float(batch.label.float().mean()), abs=1e-6)


def test_kl_point_is_averaged_over_processes_before_the_clamp():
    from types import SimpleNamespace

    from rlft.methods.kto import UnpairedLogps

    kto = KTO("tiny-llama", lora=LORA)  # the network is not built: the KL point needs log-probs only
    policy = UnpairedLogps(torch.zeros(2), torch.tensor([-1.0, -2.0]), torch.ones(2))
    reference = UnpairedLogps(torch.zeros(2), torch.tensor([-1.5, -2.5]), torch.ones(2))
    assert float(kto.kl_reference_point(policy, reference)) == pytest.approx(0.5)  # one process
    kto._trainer = SimpleNamespace(world_size=2)
    kto.sum_over_processes = lambda kl: kl + 0.3  # the other process's batch mean is 0.3
    assert float(kto.kl_reference_point(policy, reference)) == pytest.approx(0.4)
    kto.sum_over_processes = lambda kl: kl - 1.5  # a negative mean over both processes clamps to 0
    assert float(kto.kl_reference_point(policy, reference)) == 0.0


def test_batch_of_one_is_refused(tmp_path):
    import lightning as L

    data = PreferenceDataModule(path=DATA, batch_size=1, val_fraction=0.0, limit=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="KTO needs data.batch_size >= 2"):
        trainer.fit(KTO("tiny-llama", lora=LORA), data)


def test_packed_batches_are_refused():
    assert KTO.supports_packed_batches is False and KTO.data_kind == "unpaired"


def test_kto_tiny_config_through_the_cli_with_validation(cli_fit, tmp_path):
    # one fixed training batch (limit = batch_size, no shuffle) and 10x the config's lr: 30 steps are a few hundred
    # steps' worth of lr on that batch, so learning shows within the run; validation runs on the held-out rows
    rows = cli_fit(
        "kto",
        "--trainer.val_check_interval",
        "15",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "2",
        "--data.init_args.limit",
        "8",
        "--data.init_args.val_path",
        DATA,
        "--data.init_args.val_limit",
        "16",
        "--data.init_args.shuffle",
        "false",
        "--model.init_args.optim.lr",
        "1.0e-2",
        steps=30,
        validate=False,
    )
    losses, kls = rows.column("train/loss"), rows.column("train/kl")
    chosen, rejected = rows.column("train/rewards/chosen"), rows.column("train/rewards/rejected")
    print(f"\nKTO tiny CLI: train losses {[round(x, 4) for x in losses]}")
    print(f"train rewards chosen {[round(x, 3) for x in chosen]}")
    print(f"train rewards rejected {[round(x, 3) for x in rejected]}; kl {[round(x, 4) for x in kls]}")
    print(f"val losses {rows.column('val/loss')}")
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # a fresh adapter is its reference
    assert len(losses) == 30 and all(k >= 0 for k in kls) and rows.column("train/logps/rejected")
    assert len(rows.column("val/loss")) == 2 and len(rows.column("val/rewards/chosen")) == 2
    assert (tmp_path / "hf" / "adapter_config.json").exists()
    # learning on the batch trained on: the loss falls and the desirable rows' reward rises above the undesirable
    assert sum(losses[-5:]) / 5 < 0.5 - 0.02
    assert chosen[-1] > 0 > rejected[-1]
