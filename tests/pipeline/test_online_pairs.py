"""Online DPO pairs only what DPO can train on: a round whose policy samples an empty reply (or the same reply twice)
drops that prompt's pair and counts it, instead of writing a pairs file the round's DPO fit then refuses."""

from __future__ import annotations

import json

import pytest

from rlft.pipeline.online import describe_skipped, pair_samples

PROMPTS = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(4)]


class LengthPenalty:
    """A reward scorer preferring short replies."""

    def score_exchanges(self, prompts, responses):
        return [-len(r) for r in responses]


def test_empty_or_identical_best_and_worst_are_dropped_and_counted():
    samples = [
        ["", "It is 0.", "0"],  # the reward prefers the empty reply: it would be "chosen"
        ["It is 2.", "  \n", "2"],  # a whitespace-only reply scored worst: it would be "rejected"
        ["4", "4 ", "4"],  # chosen == rejected once stripped
        ["It is 6.", "7", "six"],  # a usable pair
    ]
    rewards = [5.0, 1.0, 0.0] + [1.0, -3.0, 0.5] + [1.0, 0.0, 0.5] + [2.0, -1.0, 0.0]
    pairs, skipped = pair_samples(PROMPTS, samples, rewards)
    assert skipped == {"empty": 2, "identical": 1, "small_margin": 0}
    assert pairs == [
        {"prompt": PROMPTS[3], "chosen": "It is 6.", "rejected": "7", "chosen_reward": 2.0, "rejected_reward": -1.0}
    ]
    assert describe_skipped(skipped) == "2 empty reply, 1 chosen == rejected"
    assert describe_skipped(dict.fromkeys(skipped, 0)) == "none"


def test_a_margin_at_or_below_min_margin_is_dropped():
    pairs, skipped = pair_samples(PROMPTS[:1], [["a", "b"]], [1.0, 0.5], min_margin=0.5)
    assert not pairs and skipped["small_margin"] == 1


@pytest.fixture
def stub_sampling(monkeypatch):
    """``sample_pairs`` without models: the "policy" answers from a fixed list, the "reward model" prefers short
    replies, so an empty sample scores best."""
    import rlft.eval.reward_bench as reward_bench
    import rlft.generation.generator as generator
    import rlft.models as models

    replies: dict[str, list[str]] = {}

    class StubGenerator:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, prompts, settings, batch_size=None):
            assert settings.num_samples == 3 and batch_size == 8 * 3  # 8 prompts of 3 samples per forward
            return [list(replies[p[-1]["content"]]) for p in prompts]

    monkeypatch.setattr(generator, "Generator", StubGenerator)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: object())
    monkeypatch.setattr(reward_bench, "load_reward_scorer", lambda path: LengthPenalty())
    return replies


def _sample(tmp_path, replies: dict[str, list[str]], stub_sampling):
    from rlft.pipeline.online import sample_pairs

    stub_sampling.update(replies)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in replies))
    out = tmp_path / "round_1" / "pairs.jsonl"
    stats = sample_pairs(
        "policy",
        "rm",
        str(prompts),
        str(out),
        offset=0,
        count=8,
        samples_per_prompt=3,
        max_new_tokens=8,
        temperature=1.0,
    )
    return stats, out


def test_a_round_whose_policy_samples_an_empty_reply_writes_only_trainable_pairs(tmp_path, stub_sampling):
    from rlft.data.formats import convert
    from rlft.data.sources import read_rows

    stats, out = _sample(
        tmp_path, {"Say hi.": ["", "hi there", "hello"], "Count.": ["one two", "1 2 3 4 5", "12"]}, stub_sampling
    )
    assert stats["pairs"] == 1 and stats["skipped"]["empty"] == 1
    assert json.loads((out.parent / "sampling.json").read_text())["skipped"]["empty"] == 1  # the round's record
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("12", "1 2 3 4 5")]
    records, _ = convert(read_rows(str(out)), kind="pairs", on_invalid="error")  # what the DPO fit reads: accepted
    assert len(records) == 1


def test_a_round_with_no_usable_pair_left_fails_saying_why(tmp_path, stub_sampling):
    with pytest.raises(ValueError, match=r"no usable pair left from 2 prompts \(dropped: 1 empty reply, 1 chosen =="):
        _sample(tmp_path, {"Say hi.": ["", "hi", "hey"], "Count.": ["1", "1", "1 "]}, stub_sampling)
    assert not (tmp_path / "round_1" / "pairs.jsonl").exists()
