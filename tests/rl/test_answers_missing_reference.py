"""A row without a reference (None, NaN from a Parquet/pandas cell, a blank CSV cell, an empty list) is refused with
its row and field named, or skipped and counted when asked; it is never scored against the text "None" or "nan"."""

from __future__ import annotations

import math

import pytest

from rlft.rl.answers import MissingReferenceError, is_correct, is_missing, reference
from rlft.rl.rewards import RewardSpec, build_reward

PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
MISSING = [None, math.nan, float("nan"), "", "   ", [], [None, math.nan]]


@pytest.mark.parametrize("value", MISSING, ids=repr)
def test_every_kind_of_missing_reference_is_recognised(value):
    assert is_missing(value)
    with pytest.raises(MissingReferenceError, match=r"row 4 has no reference in field 'answer'"):
        reference(value, row=4, field="answer", where="test")
    with pytest.raises(MissingReferenceError):
        is_correct("None", value)  # the last line: "None" must not match a None reference


@pytest.mark.parametrize("value", ["0", 0, 0.0, "None", ["a", None], False])
def test_present_references_are_kept(value):
    assert not is_missing(value)
    assert reference(["a", None], row=0, field="answer", where="test") == ["a"]


@pytest.mark.parametrize("value", [None, math.nan, ""], ids=repr)
def test_exact_match_reward_refuses_a_missing_reference_naming_row_field_and_prompt(value):
    reward = build_reward(RewardSpec("exact_match"))
    with pytest.raises(MissingReferenceError, match=r"exact_match reward \(prompt 'question 1'\): row 1 .*'answer'"):
        reward(PROMPTS, ["4", str(value), "nan"], answer=["4", value, "5"])  # "None"/"nan" would have scored 1.0


def test_exact_match_reward_skips_and_counts_when_asked():
    reward = build_reward(RewardSpec("exact_match", options={"missing": "skip"}))
    scores, metrics = reward(PROMPTS, ["4", "None", "nan"], answer=["4", None, math.nan])
    assert scores == [1.0, 0.0, 0.0] and metrics == {"missing_reference": 2}
    with pytest.raises(ValueError, match="missing must be one of"):
        build_reward(RewardSpec("exact_match", options={"missing": "ignore"}))


def test_other_built_in_rewards_refuse_a_missing_field_value():
    regex = build_reward(RewardSpec("regex", options={"pattern": "^{field}$", "field": "answer"}))
    with pytest.raises(MissingReferenceError, match=r"regex reward .*row 0 .*'answer'"):
        regex(PROMPTS[:1], ["None"], answer=[None])
    tests = build_reward(RewardSpec("code_tests", options={"entry_point_field": None}))
    with pytest.raises(MissingReferenceError, match=r"code_tests reward .*row 0 .*'test'"):
        tests(PROMPTS[:1], ["x = 1"], test=[None])  # would have run the program `None` and passed
