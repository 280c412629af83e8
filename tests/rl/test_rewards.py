"""Reward sources: verifiable matches, user functions from YAML strings, sandboxed unit tests, reward models."""

from __future__ import annotations

import textwrap

import pytest
import torch

from rlft.rl.answers import extract_code, normalise_answer
from rlft.rl.rewards import (
    Rewards,
    RewardSpec,
    as_reward_tensor,
    build_reward,
    build_test_program,
)

PROMPTS = [[{"role": "user", "content": "q"}]] * 4


def test_exact_match_extractors_and_normalisation():
    full = build_reward(RewardSpec("exact_match"))
    assert full(PROMPTS[:3], ["12", " 12.0. ", "twelve"], answer=["12", "12", "Twelve"]) == [1.0, 1.0, 1.0]
    last = build_reward(RewardSpec("exact_match", options={"extract": "last_number"}))
    completions = ["7 + 5 = 12", "It is 1,575.", "no number", "-34 is the answer"]
    assert last(PROMPTS, completions, answer=["12", "1575", "3", "-34"]) == [1.0, 1.0, 0.0, 1.0]
    boxed = build_reward(RewardSpec("exact_match", options={"extract": "boxed"}))
    assert boxed(PROMPTS[:2], ["so \\boxed{42}", "42"], answer=["42", "42"]) == [1.0, 0.0]
    tagged = build_reward(RewardSpec("exact_match", options={"extract": "answer_tag"}))
    assert tagged(PROMPTS[:2], ["<answer> Paris </answer>", "Paris"], answer=["paris", "paris"]) == [1.0, 0.0]
    custom = build_reward(RewardSpec("exact_match", options={"extract": r"Answer: (\w+)"}))
    assert custom(PROMPTS[:2], ["Answer: yes", "Answer: no"], answer=[["yes", "y"], "yes"]) == [1.0, 0.0]
    assert normalise_answer(" $3.50$ ") == normalise_answer("3.5") and normalise_answer("Yes.") == "yes"


def test_missing_field_and_bad_options_are_actionable():
    reward = build_reward(RewardSpec("exact_match", options={"field": "solution"}))
    with pytest.raises(KeyError, match="needs the field 'solution'.*answer"):
        reward(PROMPTS[:1], ["1"], answer=["1"])
    with pytest.raises(TypeError, match="bad options"):
        build_reward(RewardSpec("length", options={"nonsense": 1}))
    with pytest.raises(ValueError, match="module:function"):
        build_reward(RewardSpec("no_such_source"))
    with pytest.raises(ImportError, match="cannot import"):
        build_reward(RewardSpec("no_such_module_xyz:f"))


def test_regex_with_reference_field_and_length_target():
    fmt = build_reward(RewardSpec("regex", options={"pattern": r"^\d+$", "fullmatch": True}))
    assert fmt(PROMPTS[:3], ["123", " 45 ", "12 apples"]) == [1.0, 1.0, 0.0]
    cites = build_reward(RewardSpec("regex", options={"pattern": r"answer is {field}\b", "field": "answer"}))
    assert cites(PROMPTS[:2], ["the answer is 1+1", "the answer is 2"], answer=["1+1", "1"]) == [1.0, 0.0]
    length = build_reward(RewardSpec("length", options={"target": 4}))
    assert length(PROMPTS[:3], ["a b c d", "a b", "a b c d e f g h i"]) == [1.0, 0.5, 0.0]
    brevity = build_reward(RewardSpec("length", options={"target": 5, "unit": "chars", "mode": "at_most"}))
    assert brevity(PROMPTS[:3], ["abc", "abcdefghij", ""]) == [1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="mode"):
        build_reward(RewardSpec("length", options={"target": 5, "mode": "exact"}))


def test_user_functions_from_module_and_file(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        def brevity(prompts, completions, limit=10, **fields):
            return [1.0 if len(c) <= limit else 0.0 for c in completions]

        def uses_fields(prompts, completions, answer, **fields):
            return [float(a in c) for c, a in zip(completions, answer)]

        def wrong_length(prompts, completions, **fields):
            return [1.0]
        """
    )
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    brevity = build_reward(RewardSpec("my_rewards:brevity", options={"limit": 3}))
    assert brevity(PROMPTS[:2], ["abc", "abcd"]) == [1.0, 0.0]
    from_file = build_reward(RewardSpec(f"{tmp_path / 'my_rewards.py'}:uses_fields"))
    assert from_file(PROMPTS[:2], ["it is 4", "it is 5"], answer=["4", "4"]) == [1.0, 0.0]
    combined = Rewards(
        [
            {"source": "my_rewards:uses_fields", "weight": 2.0},
            {"source": "my_rewards:brevity", "weight": -1.0, "options": {"limit": 5}},
        ]
    )
    total, parts = combined(PROMPTS[:2], ["4", "it is 5"], {"answer": ["4", "4"]})
    assert total.tolist() == [2.0 * 1 - 1.0 * 1, 2.0 * 0 - 1.0 * 0] and set(parts) == {"uses_fields", "brevity"}
    with pytest.raises(ValueError, match="returned \\(1,\\) values for 2"):
        Rewards([{"source": "my_rewards:wrong_length"}])(PROMPTS[:2], ["a", "b"], {})
    with pytest.raises(ValueError, match="non-finite"):
        as_reward_tensor([float("nan")], 1)


HUMANEVAL_STYLE = {
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_code_tests_in_the_sandbox():
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",  # chat answer with a fence
        "def add(a, b):\n    return a - b\n",  # wrong
        "def add(a, b):\n    while True:\n        pass\n",  # never ends: killed at the timeout
        # needs a host file: the sandbox's file system holds no /etc at all
        "def add(a, b):\n    open('/etc/hostname').read()\n    return a + b\n",
    ]
    reward = build_reward(RewardSpec("code_tests", options={"timeout_s": 2.0, "memory_mb": 256, "workers": 2}))
    fields = {k: [v] * 4 for k, v in HUMANEVAL_STYLE.items()}
    assert reward(PROMPTS, completions, **fields) == [1.0, 0.0, 0.0, 0.0]


def test_code_tests_completion_mode_with_prompt_prefix():
    reward = build_reward(RewardSpec("code_tests", options={"prefix_field": "code_prompt", "timeout_s": 5.0}))
    fields = {**{k: [v] for k, v in HUMANEVAL_STYLE.items()}, "code_prompt": ["def add(a, b):\n"]}
    assert reward(PROMPTS[:1], ["    return a + b\n"], **fields) == [1.0]
    assert extract_code("no fence") == "no fence"
    program = build_test_program("x = 1", "def check(f):\n    pass", "f", prefix="")
    assert program.endswith("check(f)\n")


def test_reward_model_source_matches_the_scorer(tmp_path):
    from rlft.methods import RewardModel
    from rlft.models.reward import RewardScorer

    torch.manual_seed(0)
    module = RewardModel(model="tiny-llama", lora=None)
    for param in module.model.head.parameters():  # an untrained head may be all zeros: make scores differ
        torch.nn.init.normal_(param, std=1.0)
    folder = module.export(tmp_path / "rm")
    completions = ["Paris is the capital.", "I do not know.", "0123"]
    reward = build_reward(RewardSpec("reward_model", options={"path": str(folder), "batch_size": 2}))
    got = reward(PROMPTS[:3], completions)
    expected = RewardScorer.from_pretrained(folder).score(PROMPTS[:3], completions)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(round(v, 4) for v in got)) == 3  # distinct texts get distinct scores
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward(RewardSpec("reward_model", options={"path": str(tmp_path / "missing")}))
