"""ORPO and SimPO (reference-free) against independently computed losses; every preference config runs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.losses import orpo_loss, simpo_loss  # noqa: E402
from rlft.methods import ORPO, SimPO  # noqa: E402
from rlft.models.scoring import pair_logps  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PAIRS = str(REPO / "rlft" / "assets" / "sample_pairs.jsonl")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two oversubscribed ones on this shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch_for(module) -> dict:
    data = PreferenceDataModule(path=PAIRS, max_length=96, val_fraction=0.0)
    data.attach("pairs", module.tokenizer).setup()
    return Collator("pairs", module.tokenizer.pad_token_id)(data.train_set[:6])


def mean_logps_by_hand(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-averaged response log-probs from a plain float64 log_softmax, one side at a time."""
    out = []
    for side in ("chosen", "rejected"):
        logits = model(input_ids=batch.side(side).input_ids, attention_mask=batch.side(side).attention_mask).logits
        labels = batch.side(side).labels[:, 1:]
        mask = labels != -100
        token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        out.append(((token * mask).sum(-1) / mask.sum(-1)).float())
    return out[0], out[1]


def perturb_adapter(module) -> None:
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_orpo_loss_equals_independent_computation():
    orpo = ORPO("tiny-llama", lora=LORA, beta=0.25)
    perturb_adapter(orpo)
    batch = batch_for(orpo)
    with torch.no_grad():
        loss, metrics = orpo.compute_loss(batch)
        chosen, rejected = mean_logps_by_hand(orpo.model, batch)
    expected, stats = orpo_loss(chosen, rejected, -chosen, beta=0.25)
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert metrics["nll"].item() == pytest.approx(-chosen.mean().item(), abs=1e-4)
    assert metrics["log_odds_ratio"].item() == pytest.approx(stats["log_odds_ratio"].mean().item(), abs=1e-4)
    assert metrics["logps/chosen"].item() == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert not any(name.startswith("ref") for name, _ in orpo.named_children())  # no reference anywhere


@pytest.mark.parametrize("nll_weight", [0.0, 0.3])
def test_simpo_loss_equals_independent_computation(nll_weight):
    simpo = SimPO("tiny-llama", lora=LORA, beta=2.5, gamma=0.7, label_smoothing=0.1, nll_weight=nll_weight)
    perturb_adapter(simpo)
    batch = batch_for(simpo)
    with torch.no_grad():
        loss, metrics = simpo.compute_loss(batch)
        chosen, rejected = mean_logps_by_hand(simpo.model, batch)
    expected, stats = simpo_loss(chosen, rejected, beta=2.5, gamma=0.7, label_smoothing=0.1)
    chosen_rewards = stats["chosen_rewards"]
    expected = expected + nll_weight * -chosen
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-4)
    assert ("nll" in metrics) == bool(nll_weight)


def train_on_one_batch(tmp_path, module, steps: int = 12) -> tuple[dict, dict]:
    """Metrics on a fixed batch of 8 pairs before and after ``steps`` optimiser steps on it."""
    data = PreferenceDataModule(path=PAIRS, batch_size=8, max_length=96, val_fraction=0.0, limit=8)
    data.attach("pairs", module.tokenizer).setup()
    batch = Collator("pairs", module.tokenizer.pad_token_id)(data.train_set)
    with torch.no_grad():
        before_loss, before = module.compute_loss(batch)
    torch.manual_seed(0)
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    ).fit(module, data)
    with torch.no_grad():
        after_loss, after = module.compute_loss(batch)
    return before | {"loss": before_loss}, after | {"loss": after_loss}


def test_simpo_training_separates_chosen_from_rejected(tmp_path):
    before, after = train_on_one_batch(tmp_path, SimPO("tiny-llama", lora=LORA, optim={"lr": 3e-3}))
    assert after["loss"] < before["loss"] - 0.05
    assert after["rewards/margin"] > before["rewards/margin"] and after["rewards/accuracy"] >= 0.75


def test_orpo_odds_ratio_term_separates_beyond_plain_sft(tmp_path):
    torch.manual_seed(0)
    sft_only = train_on_one_batch(tmp_path / "a", ORPO("tiny-llama", lora=LORA, optim={"lr": 3e-3}, beta=0.0))[1]
    torch.manual_seed(0)
    before, after = train_on_one_batch(tmp_path / "b", ORPO("tiny-llama", lora=LORA, optim={"lr": 3e-3}, beta=2.0))
    assert after["loss"] < before["loss"] - 0.05 and after["nll"] < before["nll"]
    # with the same seed, data and steps, only the odds-ratio term can make the margin grow more
    assert after["log_odds_chosen"] > sft_only["log_odds_chosen"] + 0.01


@pytest.mark.parametrize("method", ["rm", "dpo", "orpo", "simpo"])
def test_tiny_config_runs_through_the_cli(tmp_path, method):
    from rlft.cli.fit import run_lightning_cli

    out = tmp_path / "hf"
    cli = run_lightning_cli(
        [
            "fit",
            "-c",
            str(REPO / "configs" / method / "tiny.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.output_dir",
            str(out),
            "--data.init_args.max_length",
            "96",
        ]
    )
    assert cli.trainer.global_step == 2
    # a reward model ships merged as a sequence classifier (its trained head as `score`); the others as adapters
    assert (out / ("reward_config.json" if method == "rm" else "adapter_config.json")).exists()
    assert "val/loss" in cli.trainer.callback_metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_smollm2_configs_parse():
    import yaml

    for method in ("rm", "dpo", "orpo", "simpo"):
        config = yaml.safe_load((REPO / "configs" / method / "smollm2_lora.yaml").read_text())
        assert config["model"]["init_args"]["model"] == "smollm2-135m-instruct"
        assert config["data"]["init_args"]["path"] == "rlft/assets/sample_pairs.jsonl"
        assert "shared" not in str(config)


@pytest.mark.parametrize("method", [ORPO, SimPO])
def test_per_row_weight_and_the_batch_reach_the_reference_free_methods(method):
    module = method("tiny-llama", lora=LORA, **({"nll_weight": 0.5} if method is SimPO else {}))
    perturb_adapter(module)
    batch = batch_for(module)
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0])
    seen = []
    hook = module.preference_loss
    module.preference_loss = lambda policy, batch: seen.append(batch) or hook(policy, batch)
    with torch.no_grad():
        logps = pair_logps(module.model, batch)
        losses = hook(logps, batch).losses + (0.5 * logps.chosen_nll if method is SimPO else 0.0)
        weighted, metrics = module.compute_loss(replace(batch, fields={"weight": weight}))
    assert weighted.item() == pytest.approx(((weight * losses).sum() / weight.sum()).item(), abs=1e-5)
    assert torch.equal(seen[0].field("weight"), weight) and "rewards/accuracy" in metrics
