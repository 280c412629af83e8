"""RewardModel: reward at the last real token for any padding side, BT loss options, metrics, export + scorer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.data.padding import pad  # noqa: E402
from rlft.losses import bradley_terry_loss  # noqa: E402
from rlft.methods import RewardModel  # noqa: E402
from rlft.metrics import pairwise_auroc  # noqa: E402
from rlft.models.reward import CONFIG_FILE, HEAD_FILE, RewardScorer  # noqa: E402
from rlft.models.scoring import last_token_index  # noqa: E402

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


def reward_by_hand(rm: RewardModel, ids: list[int]) -> float:
    """Reward of one unpadded sequence: head(final hidden state of its last token), through plain HF calls."""
    backbone = rm.model.backbone
    lm = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    with torch.no_grad():
        hidden = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        return rm.model.head(hidden[0, -1]).item()


def randomize_head(rm: RewardModel) -> RewardModel:
    """The head starts at 0 (all rewards 0); give it random weights so rewards tell sequences apart."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in rm.model.head.parameters():
            p.normal_(std=0.1)
    return rm


def test_head_starts_at_zero_reward():
    rm = RewardModel("tiny-llama", lora=LORA, head="mlp")
    assert rm.model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_the_output_bias_trains_only_where_a_loss_gives_it_a_gradient(head, tmp_path):
    # pairwise losses compare rewards: the offset's true gradient is 0, and Adam would turn its rounding into steps
    data = PreferenceDataModule(path="rlft/assets/sample_pairs.jsonl", batch_size=4, max_length=64, val_fraction=0.0)
    for center_coef, trains in ((0.0, False), (0.5, True)):
        rm = RewardModel("tiny-llama", lora=LORA, head=head, center_coef=center_coef, optim={"lr": 1e-2})
        rm.hparams.output_dir = str(tmp_path / "hf")
        trainer = L.Trainer(
            max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
        )
        trainer.fit(rm, data)
        bias = list(rm.model.head.modules())[-1].bias
        assert bias.requires_grad is trains and (float(bias) != 0.0) is trains


def test_last_token_index_any_padding_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_reward_is_read_at_last_real_token_for_left_and_right_padding(family):
    rm = randomize_head(RewardModel(family, lora=None).eval())
    pad_id = rm.tokenizer.pad_token_id
    seqs = [[5, 9, 17, 33, 2], [7, 8], [40, 41, 42]]
    expected = torch.tensor([reward_by_hand(rm, s) for s in seqs])
    with torch.no_grad():
        for left in (False, True):
            ids = pad(seqs, pad_id, left=left)
            mask = pad([[1] * len(s) for s in seqs], 0, left=left)
            torch.testing.assert_close(rm.model(ids, mask), expected, atol=1e-4, rtol=0)
        # the classic bug: reading the last column of a right-padded batch scores padding, not the reply
        ids, mask = pad(seqs, pad_id), pad([[1] * len(s) for s in seqs], 0)
        wrong = rm.model(ids, torch.ones_like(mask))
        assert not torch.allclose(wrong[1:], expected[1:], atol=1e-3)


@pytest.mark.parametrize("options", [{}, {"margin": 0.5}, {"center_coef": 0.01}, {"head": "mlp"}])
def test_bradley_terry_loss_and_metrics_from_independent_rewards(options):
    rm = randomize_head(RewardModel("tiny-llama", lora=LORA, **options).eval())
    data = PreferenceDataModule(path=PAIRS, max_length=96, val_fraction=0.0)
    data.attach("pairs", rm.tokenizer).setup()
    examples = data.train_set[:5]
    batch = Collator("pairs", rm.tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        loss, metrics = rm.compute_loss(batch)
    chosen = torch.tensor([reward_by_hand(rm, e["prompt_ids"] + e["chosen_ids"]) for e in examples])
    rejected = torch.tensor([reward_by_hand(rm, e["prompt_ids"] + e["rejected_ids"]) for e in examples])
    expected = bradley_terry_loss(
        chosen, rejected, margin=options.get("margin"), center_coef=options.get("center_coef", 0.0)
    ).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert metrics["accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())
    assert metrics["rewards/margin"].item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-4)


def test_unknown_head_lists_choices():
    with pytest.raises(ValueError, match="linear"):
        RewardModel("tiny-llama", head="transformer")


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_train_validate_export_and_score_two_lines(tmp_path, lora):
    rm = RewardModel(
        "tiny-llama",
        lora=lora,
        head="mlp" if lora is None else "linear",
        optim={"lr": 2e-3},
        output_dir=str(tmp_path / "rm"),
    )
    data = PreferenceDataModule(path=PAIRS, batch_size=8, max_length=96, val_fraction=0.25)
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        val_check_interval=3,
        num_sanity_val_steps=0,
    )
    trainer.fit(rm, data)
    metrics = trainer.callback_metrics
    for name in (
        "val/loss",
        "val/accuracy",
        "val/auroc",
        "val/rewards/chosen",
        "val/rewards/rejected",
        "val/rewards/margin",
        "train/loss",
        "train/accuracy",
    ):
        assert name in metrics, name

    # the documented two-line use, and the metrics recomputed from its scores
    scorer = RewardScorer.from_pretrained(tmp_path / "rm")
    prompts = [e["prompt"] for e in _records(data.val_set, data)]
    chosen = scorer.score(prompts, [e["chosen"] for e in _records(data.val_set, data)])
    rejected = scorer.score(prompts, [e["rejected"] for e in _records(data.val_set, data)])
    assert chosen.dtype == torch.float32 and chosen.shape == (len(data.val_set),)
    assert metrics["val/accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item(), abs=1e-6)
    assert metrics["val/auroc"].item() == pytest.approx(pairwise_auroc(chosen.tolist(), rejected.tolist()), abs=1e-6)
    batch = Collator("pairs", rm.tokenizer.pad_token_id)(data.val_set)
    with torch.no_grad():
        module_chosen, _ = rm.eval().pair_rewards(batch)
    torch.testing.assert_close(chosen, module_chosen, atol=1e-4, rtol=0)

    config = json.loads((tmp_path / "rm" / CONFIG_FILE).read_text())
    assert config["backbone"] == ("merged" if lora else "full") and (tmp_path / "rm" / HEAD_FILE).exists()
    from_ckpt = RewardScorer.from_pretrained(tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(
        from_ckpt.score(prompts, [e["chosen"] for e in _records(data.val_set, data)]), chosen, atol=1e-4, rtol=0
    )


def _records(encoded: list[dict], data: PreferenceDataModule) -> list[dict]:
    """Recover prompt (messages) and reply strings of encoded pairs by re-reading the file in the same split."""
    from rlft.data.formats import convert
    from rlft.data.sources import read_rows

    records, _ = convert(read_rows(PAIRS), kind="pairs")
    by_ids = {}
    for record in records:
        enc = data._encode_one(record)
        by_ids[tuple(enc["prompt_ids"] + enc["chosen_ids"])] = record
    return [by_ids[tuple(e["prompt_ids"] + e["chosen_ids"])] for e in encoded]


def test_scorer_accepts_strings_or_messages_and_checks_lengths(tmp_path):
    rm = randomize_head(RewardModel("tiny-llama", lora=LORA))
    rm.export(tmp_path / "rm")
    scorer = RewardScorer.from_pretrained(tmp_path / "rm", batch_size=2)
    as_text = scorer.score(["What is 2 + 2?", "Name a colour."], ["4", "Blue, like the sky on a clear day."])
    as_messages = scorer.score(
        [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Name a colour."}]],
        ["4", "Blue, like the sky on a clear day."],
    )
    torch.testing.assert_close(as_text, as_messages)
    assert as_text[0] != as_text[1]
    single = scorer.score(["Name a colour."], ["Blue, like the sky on a clear day."])
    assert single.item() == pytest.approx(as_text[1].item(), abs=1e-5)  # batch padding changes nothing
    with pytest.raises(ValueError, match="one per prompt"):
        scorer.score(["a", "b"], ["only one"])
    with pytest.raises(FileNotFoundError, match="reward_config.json"):
        RewardScorer.from_pretrained(tmp_path)


def test_hh_transcripts_with_mismatched_prompts_are_reported(tmp_path, caplog):
    good = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    mismatch = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Something else\n\nAssistant: Hello!!",
    }
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, mismatch, good | {"rejected": good["chosen"]})) + "\n")
    rm = RewardModel("tiny-llama", lora=LORA)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(ValueError) as error:
        trainer.fit(rm, PreferenceDataModule(path=str(path), val_fraction=0.0))
    assert "hh.jsonl:2" in str(error.value) and "prompt" in str(error.value)
    caplog.set_level("WARNING")
    data = PreferenceDataModule(path=str(path), val_fraction=0.0, skip_invalid=True, dedupe=False)
    trainer.fit(rm, data)
    assert len(data.train_set) == 1


# ---------------------------------------------------------------------------------------------- per-row fields, hooks
def test_per_row_margin_wins_over_the_constant_and_weight_weights_the_mean():
    rm = randomize_head(RewardModel("tiny-llama", lora=LORA, margin=0.5).eval())
    data = PreferenceDataModule(path=PAIRS, max_length=96, val_fraction=0.0)
    data.attach("pairs", rm.tokenizer).setup()
    margins, weights = [0.0, 1.0, -2.0, 0.25, 3.0], [1.0, 2.0, 0.0, 1.0, 0.5]
    examples = [dict(e, margin=m, weight=w) for e, m, w in zip(data.train_set[:5], margins, weights)]
    batch = Collator("pairs", rm.tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        loss, metrics = rm.compute_loss(batch)
    chosen = torch.tensor([reward_by_hand(rm, e["prompt_ids"] + e["chosen_ids"]) for e in examples])
    rejected = torch.tensor([reward_by_hand(rm, e["prompt_ids"] + e["rejected_ids"]) for e in examples])
    # Llama 2's margin loss by hand, -log sigmoid(r_c - r_r - m_i), and the weighted mean sum(w l) / sum(w)
    losses = [-torch.nn.functional.logsigmoid(c - r - m).item() for c, r, m in zip(chosen, rejected, margins)]
    expected = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen, atol=1e-4, rtol=0)  # per pair, for validation
    without = Collator("pairs", rm.tokenizer.pad_token_id)(data.train_set[:5])
    with torch.no_grad():  # no per-row margin: the constant one
        constant, _ = rm.compute_loss(without)
    expected = torch.nn.functional.logsigmoid(chosen - rejected - 0.5).neg().mean()
    assert constant.item() == pytest.approx(expected.item(), abs=1e-4)


class DoubleMarginRM(RewardModel):
    """A margin-aware variant as a user writes it: only the pair loss changes (twice each pair's margin)."""

    def reward_loss(self, chosen, rejected, batch):
        return bradley_terry_loss(chosen, rejected, margin=2 * batch.field("margin").to(chosen))


class DoubledLossRM(RewardModel):
    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        return 2 * loss, metrics


def test_reward_loss_and_compute_loss_overrides_reach_training_and_validation(tmp_path):
    import math

    rows = [json.loads(line) for line in Path(PAIRS).read_text().splitlines()[:8]]
    path = tmp_path / "margins.jsonl"
    path.write_text("".join(json.dumps(row | {"margin": 1.0}) + "\n" for row in rows))

    def run(module) -> tuple[float, dict]:
        # the head starts at 0, so every reward is 0 and each loss is exact: -log sigmoid(-m) = softplus(m)
        options = dict(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        data = PreferenceDataModule(path=str(path), val_path=str(path), batch_size=4, max_length=96)
        validated = L.Trainer(**options).validate(module, data, verbose=False)[0]
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, **options)
        trainer.fit(module, data)
        return float(trainer.callback_metrics["train/loss"]), validated

    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    for module, expected in (
        (RewardModel("tiny-llama", lora=LORA, margin=5.0), softplus(1.0)),
        (DoubleMarginRM("tiny-llama", lora=LORA), softplus(2.0)),
        (DoubledLossRM("tiny-llama", lora=LORA), 2 * softplus(1.0)),
    ):
        train_loss, validated = run(module)
        assert train_loss == pytest.approx(expected, abs=1e-5), type(module).__name__
        assert validated["val/loss"] == pytest.approx(expected, abs=1e-5), type(module).__name__
        assert validated["val/accuracy"] == 0.0 and validated["val/auroc"] == pytest.approx(0.5)  # all ties
