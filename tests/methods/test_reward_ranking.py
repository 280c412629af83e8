"""A reward model trained on K-wise rankings: the ranked format, RankingDataModule batches, one forward for all K
responses of a prompt, and a listwise loss that actually teaches the ranking."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402

from rlft.data import RankingDataModule  # noqa: E402
from rlft.data.errors import DataError  # noqa: E402
from rlft.methods import RewardModel  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def _rankings(path, n: int = 24) -> str:
    rows = []
    for i in range(n):
        # best first: the reward to learn is "more 'good' words"; K varies between 3 and 4
        responses = ["good " * 6 + f"answer {i}", "good " * 3 + f"answer {i}", f"answer {i}", f"bad bad {i}"]
        row = {"prompt": f"Question number {i}?", "responses": responses[: 3 + i % 2]}
        if i % 3 == 0:  # the scored variant, shuffled: the scores give the order
            order = [2, 0, 1][: len(row["responses"])] + ([3] if len(row["responses"]) == 4 else [])
            row = {
                "prompt": row["prompt"],
                "responses": [row["responses"][j] for j in order],
                "scores": [-j for j in order],
            }
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ranking_batches_hold_every_response_best_first(tmp_path):
    rm = RewardModel("tiny-llama", lora=LORA)
    dm = RankingDataModule(_rankings(tmp_path / "r.jsonl"), batch_size=3, val_fraction=0.0, shuffle=False)
    dm.attach("pairs", rm.tokenizer).setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.sizes.tolist() == [3, 4, 3]
    assert batch.tokens.input_ids.shape[0] == 10
    first = rm.tokenizer.decode(batch.tokens.input_ids[0][batch.tokens.attention_mask[0].bool()])
    assert "good good good good good good answer 0" in first  # the scored row was reordered by its scores
    rewards, mask = rm.ranking_rewards(batch)
    assert rewards.shape == (3, 4) and mask.sum().item() == 10
    with pytest.raises(DataError, match="needs 'sft' data"):
        dm.attach("sft", rm.tokenizer)


@pytest.mark.parametrize("loss", ["plackett_luce", "kwise_bradley_terry"])
def test_listwise_reward_model_learns_the_ranking(tmp_path, loss):
    torch.manual_seed(0)
    rm = RewardModel(
        "tiny-llama",
        lora=LORA,
        ranking_loss=loss,
        optim={"lr": 3e-3, "warmup_steps": 0},
        output_dir=str(tmp_path / "rm"),
    )
    dm = RankingDataModule(_rankings(tmp_path / "r.jsonl"), batch_size=4, val_fraction=0.25, seed=0)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=30,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(rm, dm)
    metrics = trainer.callback_metrics
    # held-out rankings: every (better, worse) pair of 6 prompts; chance is 0.5
    assert metrics["val/accuracy"].item() >= 0.9 and metrics["val/auroc"].item() >= 0.9, metrics
    assert (tmp_path / "rm" / "reward_config.json").exists()


def test_unknown_ranking_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown ranking_loss 'listnet'"):
        RewardModel("tiny-llama", lora=LORA, ranking_loss="listnet")


def test_invalid_ranked_rows_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "responses": ["a", "a"]})
        + "\n"
        + json.dumps({"prompt": "q", "responses": ["a", "b"], "scores": [1]})
        + "\n"
    )
    rm = RewardModel("tiny-llama", lora=LORA)
    dm = RankingDataModule(str(path), val_fraction=0.0).attach("pairs", rm.tokenizer)
    with pytest.raises(DataError) as error:
        dm.setup("fit")
    text = str(error.value) + "".join(str(i) for i in error.value.issues)
    assert "2 invalid ranked rows" in text and "scores" in text and "same reply twice" in text


def test_ranked_rows_expand_to_every_better_worse_pair():
    from rlft.data.formats import convert
    from rlft.data.sources import Row

    row = Row({"prompt": "Pick", "responses": ["a", "b", "c", "d"]}, "r.jsonl", 1)
    pairs, report = convert([row], kind="pairs")
    assert report.format == "ranked"
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
