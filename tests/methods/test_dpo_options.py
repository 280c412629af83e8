"""DPO: its options and loss types (against rlft.losses.dpo_loss), subclassing, bad input and per-row fields."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.losses import DPO_LOSS_TYPES, dpo_loss  # noqa: E402
from rlft.methods import DPO  # noqa: E402
from rlft.outputs import LossOutput  # noqa: E402
from tests.methods.test_dpo import LORA, PAIRS, pairs_batch, reference_logps_by_hand, trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- options and subclassing
@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "sigmoid", "label_smoothing": 0.1},
        {"loss_type": "ipo", "beta": 0.5},
        {"loss_type": "hinge"},
        {"loss_type": "sigmoid", "rpo_alpha": 0.5},
    ],
)
def test_options_reach_the_loss(options):
    batch = pairs_batch("tiny-llama")
    dpo = DPO("tiny-llama", lora=LORA, **options)
    with torch.no_grad():
        for name, p in dpo.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    loss, metrics = dpo.compute_loss(batch)
    policy = reference_logps_by_hand(dpo.model, batch)
    with dpo.model.disable_adapter():
        ref = reference_logps_by_hand(dpo.model, batch)
    tokens = [(batch.side(s).labels[:, 1:] != -100).sum(-1) for s in ("chosen", "rejected")]
    if options["loss_type"] == "ipo":  # IPO compares length-averaged log-probs
        policy = (policy[0] / tokens[0], policy[1] / tokens[1])
        ref = (ref[0] / tokens[0], ref[1] / tokens[1])
    rpo = options.get("rpo_alpha")
    expected, stats = dpo_loss(
        *policy,
        *ref,
        beta=options.get("beta", 0.1),
        loss_type=options["loss_type"],
        label_smoothing=options.get("label_smoothing", 0.0),
        rpo_alpha=rpo,
        chosen_nll=-policy[0] / tokens[0] if rpo is not None else None,
    )
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert metrics["rewards/chosen"].item() == pytest.approx(stats["chosen_rewards"].mean().item(), abs=1e-4)
    assert ("nll" in metrics) == (rpo is not None)


def test_unknown_loss_type_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="sigmoid"):
        DPO("tiny-llama", loss_type="nope")


class ScaledMarginDPO(DPO):
    """A user's subclass: only the loss changes (here: DPO with a fixed target margin of 0.5 in reward units)."""

    def preference_loss(self, policy, reference, batch):
        chosen_rewards = self.hparams.beta * (policy.chosen - reference.chosen)
        rejected_rewards = self.hparams.beta * (policy.rejected - reference.rejected)
        losses = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards - 0.5)
        rewards = {"chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach()}
        return LossOutput(losses, rewards)


def test_user_subclass_overrides_one_method_and_trains(tmp_path):
    torch.manual_seed(0)  # the LoRA init and the loader's order: not whatever earlier tests left in the RNG
    batch = pairs_batch("tiny-llama")
    model = ScaledMarginDPO("tiny-llama", lora=LORA, optim={"lr": 2e-3})
    loss, _ = model.compute_loss(batch)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-0.5)).item(), abs=1e-5)
    data = PreferenceDataModule(path=PAIRS, batch_size=4, max_length=96, val_fraction=0.0, limit=4)
    trainer(tmp_path, 15).fit(model, data)  # one batch seen 15 times: the custom loss must go down
    assert model.compute_loss(Collator("pairs", 0)(data.train_set[:4]))[0].item() < loss.item() - 0.1


def test_registered_loss_type_is_selectable(monkeypatch):
    monkeypatch.setitem(DPO_LOSS_TYPES, "squared", lambda logits, beta, smoothing: (beta * logits - 1) ** 2)
    batch = pairs_batch("tiny-llama")
    loss, _ = DPO("tiny-llama", lora=LORA, loss_type="squared", beta=0.2).compute_loss(batch)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # all log-ratios are 0 at initialisation


def test_training_raises_reward_accuracy_on_a_fixed_batch(tmp_path):
    data = PreferenceDataModule(path=PAIRS, batch_size=8, max_length=96, val_fraction=0.0, limit=8)
    dpo = DPO("tiny-llama", lora=LORA, optim={"lr": 3e-3})
    trainer(tmp_path, 12).fit(dpo, data)
    loss, metrics = dpo.compute_loss(Collator("pairs", 0)(data.train_set))
    assert loss.item() < math.log(2) - 0.05 and metrics["rewards/accuracy"].item() >= 0.75


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_pairs_stop_with_actionable_errors_or_counted_filters(tmp_path, caplog):
    rows = [
        '{"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}',
        '{"prompt": "Say hi", "chosen": "", "rejected": "Go away."}',
        '{"prompt": "Name a colour", "chosen": "Red", "rejected": "Red"}',
        '{"prompt": "Count", "chosen": "1 2 3"}',
        '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: bye\\n\\nAssistant: no"}',
        '{"prompt": "Add 2 and 2", "chosen": "4", "rejected": "5"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    dpo = DPO("tiny-llama", lora=LORA)
    with pytest.raises(ValueError) as error:
        trainer(tmp_path, 1).fit(dpo, PreferenceDataModule(path=str(path), val_fraction=0.0))
    message = str(error.value)
    for needle in ("bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:4", "identical", "skip_invalid"):
        assert needle in message, message
    caplog.set_level("WARNING")
    data = PreferenceDataModule(path=str(path), val_fraction=0.0, skip_invalid=True)
    trainer(tmp_path, 1).fit(dpo, data)
    assert len(data.train_set) == 2
    assert "identical" in caplog.text and "empty" in caplog.text


# ---------------------------------------------------------------------------------------------- per-row fields
def pairs_file(tmp_path: Path, n: int = 8, **fields) -> str:
    """The first ``n`` sample pairs with extra per-row fields: ``name=[values]`` (``None`` leaves a row without)."""
    import json

    rows = [json.loads(line) for line in Path(PAIRS).read_text().splitlines()[:n]]
    for name, values in fields.items():
        for row, value in zip(rows, values):
            if value is not None:
                row[name] = value
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


class MarginDPO(DPO):
    """Reads a per-row field in the hook (here: simply adds each pair's ``margin`` to its loss)."""

    uses_fields = DPO.uses_fields | {"margin"}

    def preference_loss(self, policy, reference, batch):
        output = super().preference_loss(policy, reference, batch)
        output.losses = output.losses + batch.field("margin").to(output.losses)
        return output


def test_weight_gives_the_weighted_mean_and_the_hook_sees_the_batch():
    batch = pairs_batch("tiny-llama", n=4)
    dpo = DPO("tiny-llama", lora=LORA)
    with torch.no_grad():
        for name, p in dpo.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        policy, reference = dpo.policy_logps(batch), dpo.reference_logps(batch)
        losses = dpo.preference_loss(policy, reference, batch).losses
        plain, _ = dpo.compute_loss(batch)
        weight = torch.tensor([1.0, 0.0, 3.0, 0.5])
        weighted, metrics = dpo.compute_loss(replace(batch, fields={"weight": weight}))
        shifted, _ = MarginDPO("tiny-llama", lora=LORA).compute_loss(
            replace(batch, fields={"margin": torch.tensor([1.0, 2, 3, 4])})
        )
    assert plain.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert weighted.item() == pytest.approx(((weight * losses).sum() / weight.sum()).item(), abs=1e-6)
    assert "rewards/chosen" in metrics and "chosen_rewards" not in metrics
    assert shifted.item() == pytest.approx(math.log(2) + 2.5, abs=1e-5)  # a fresh adapter: every DPO loss is log 2


def test_an_unused_numeric_field_is_named_once_and_a_used_one_must_be_on_every_row(tmp_path, caplog):
    path = pairs_file(tmp_path, margin=[1.0] * 8, weight=[1.0] * 8, source=["a"] * 8)
    caplog.set_level("WARNING")
    trainer(tmp_path, 1).fit(DPO("tiny-llama", lora=LORA), PreferenceDataModule(path=path, val_fraction=0.0))
    warnings = [r.getMessage() for r in caplog.records if "per-row field" in r.getMessage()]
    assert len(warnings) == 1, warnings  # weight is used and source is no number: only margin is reported
    assert "DPO ignores the per-row field 'margin'" in warnings[0] and "RewardModel" in warnings[0]

    caplog.clear()  # a method that reads the field says nothing
    trainer(tmp_path, 1).fit(MarginDPO("tiny-llama", lora=LORA), PreferenceDataModule(path=path, val_fraction=0.0))
    assert not [r for r in caplog.records if "per-row field" in r.getMessage()]

    gappy = pairs_file(tmp_path, weight=[1.0, None, 2.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"'weight' must be a number >= 0 on every row; it is not on 2 rows"):
        trainer(tmp_path, 1).fit(DPO("tiny-llama", lora=LORA), PreferenceDataModule(path=gappy, val_fraction=0.0))
