"""RewardScorer is the ExchangeScorer of rlft's reward model; wrapped around a network being trained it scores in
eval mode without gradients and leaves the network training."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlft.methods import RewardModel  # noqa: E402
from rlft.models.reward import RewardScorer  # noqa: E402

PROMPTS = ["What is 2 + 2?", [{"role": "user", "content": "Name a colour."}], "Say hi"]
RESPONSES = ["4", "Blue, like the sky on a clear day.", "Hello! How can I help you today?"]


@pytest.fixture
def network_in_training():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rm = RewardModel("tiny-llama", lora=None)
    with torch.no_grad():
        for param in rm.model.head.parameters():
            param.normal_(std=0.1)  # non-zero rewards
    yield rm.model.train(), rm.tokenizer
    torch.set_num_threads(before)


def test_scoring_a_training_network_restores_its_mode(network_in_training):
    network, tokenizer = network_in_training
    scorer = RewardScorer(network, tokenizer, batch_size=2)
    assert network.training  # constructing the scorer changes nothing
    rewards = scorer.score(PROMPTS, RESPONSES)
    assert network.training and all(m.training for m in network.modules())
    assert not rewards.requires_grad and rewards.shape == (3,) and rewards.abs().min() > 0
    network.eval()
    expected = torch.stack([scorer.network(*_one(scorer, p, r)) for p, r in zip(PROMPTS, RESPONSES)]).flatten()
    torch.testing.assert_close(rewards, expected.detach(), atol=1e-5, rtol=0)


def test_score_exchanges_is_score_as_floats(network_in_training):
    network, tokenizer = network_in_training
    scorer = RewardScorer(network, tokenizer)
    exchanged = scorer.score_exchanges(PROMPTS, RESPONSES)
    assert all(type(x) is float for x in exchanged)
    assert exchanged == pytest.approx(scorer.score(PROMPTS, RESPONSES).tolist(), abs=1e-6)
    assert network.training


def _one(scorer: RewardScorer, prompt, response) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([scorer.encode(prompt, response)])
    return ids, torch.ones_like(ids)
