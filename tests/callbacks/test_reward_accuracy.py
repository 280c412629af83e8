"""RewardAccuracyCallback scores with the training network itself (a RewardScorer, no copy) and leaves it training."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlft.callbacks import RewardAccuracyCallback  # noqa: E402
from rlft.methods import RewardModel  # noqa: E402
from rlft.models.modes import inference  # noqa: E402

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "5, I think."},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "Hello!", "rejected": "No."},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "A dog."},
]


def test_reward_accuracy_matches_rewards_by_hand_and_keeps_training_mode(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rm = RewardModel("tiny-llama", lora=None)
        with torch.no_grad():
            for param in rm.model.head.parameters():
                param.normal_(std=0.1)
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        callback = RewardAccuracyCallback(str(path))
        network = rm.model.train()
        metrics = callback.evaluate(network, rm.tokenizer, rm)
        assert network.training
        from rlft.models.reward import RewardScorer

        with inference(network):
            scorer = RewardScorer(network, rm.tokenizer, batch_size=1)
            chosen = scorer.score([p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS])
            rejected = scorer.score([p["prompt"] for p in PAIRS], [p["rejected"] for p in PAIRS])
        wins = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
        assert metrics["rm_accuracy"] == pytest.approx(wins)
        assert metrics["rm_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    finally:
        torch.set_num_threads(before)
