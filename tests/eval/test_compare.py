"""Policy comparison: rewards, win rates with CIs, diversity and lengths from generations of several policies."""

from __future__ import annotations

import pytest

from rlft.eval.compare import generate_for_policies, prompt_text, summarize_policies
from rlft.eval.reward_bench import TextFunctionScorer
from rlft.generation.settings import SamplingSettings
from rlft.metrics import distinct_n


def reply_length(texts):
    return [float(len(t.split("Assistant: ")[-1].split())) for t in texts]


def test_summary_hand_values():
    prompts = ["a", "b", "c", "d"]
    generations = {
        "base": ["one", "one two", "one two three", "x"],
        "dpo": ["one two", "one", "one two three", "x y z w"],
    }
    result = summarize_policies(
        prompts, generations, baseline="base", scorer=TextFunctionScorer(reply_length), n_bootstrap=500
    )
    dpo = result["policies"]["dpo"]
    # word counts dpo [2,1,3,4] vs base [1,2,3,1]: win, loss, tie, win
    assert dpo["win_rate"]["rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert (dpo["win_rate"]["wins"], dpo["win_rate"]["ties"], dpo["win_rate"]["losses"]) == (2, 1, 1)
    assert dpo["win_rate"]["ci_low"] <= 0.625 <= dpo["win_rate"]["ci_high"]
    assert dpo["mean_reward"] == pytest.approx(2.5) and result["policies"]["base"]["mean_reward"] == pytest.approx(1.75)
    assert "win_rate" not in result["policies"]["base"]
    assert dpo["length_words"]["mean"] == pytest.approx(2.5)
    assert dpo["diversity"]["distinct_1"] == pytest.approx(distinct_n(generations["dpo"], 1))
    assert result["examples"][0] == {
        "prompt": "a",
        "base": "one",
        "dpo": "one two",
        "rewards": {"base": 1.0, "dpo": 2.0},
    }
    with pytest.raises(ValueError, match="baseline"):
        summarize_policies(prompts, generations, baseline="ppo")


def test_two_real_policies_generate_and_compare():
    prompts = [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "Name a fruit."}]]
    generations = generate_for_policies(
        {"base": "tiny-llama", "other": "tiny-qwen2"}, prompts, SamplingSettings(max_new_tokens=6)
    )
    assert set(generations) == {"base", "other"} and all(len(v) == 2 for v in generations.values())
    result = summarize_policies(prompts, generations, baseline="base")
    assert result["examples"][1]["prompt"] == "Name a fruit." == prompt_text(prompts[1])
    assert set(result["policies"]["other"]) >= {"diversity", "length_words", "refusal_rate"}
