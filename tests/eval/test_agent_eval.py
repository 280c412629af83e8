"""`rlft eval agent`: a tool-using agent graded by the rollout and reward code training uses.

The sampler is scripted (``my_pkg.agent_script:scripted``: a calculator call, then the tool's result as the answer;
``SCRIPT_MODE`` makes it answer wrong or write a broken call), so every number of the report is known exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlft.eval.agent import evaluate_agent
from rlft.generation.settings import ONLINE_SAMPLING, DecoderSettings, SamplingSettings
from rlft.metrics import wilson_interval
from rlft.rl.multiturn import AgentSettings
from rlft.rl.rewards import Rewards

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "rlft" / "assets" / "tool_arithmetic.jsonl"
SCRIPT = "my_pkg.agent_script:scripted"  # tests/methods is put on the path below
EXACT = [{"source": "exact_match", "options": {"field": "answer", "extract": "last_number"}}]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def script_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "methods"))


def records(n: int = 4) -> list[dict]:
    return [json.loads(line) for line in TASKS.read_text().splitlines()[:n]]


def evaluate(tiny, rows=None, max_turns=4, **options):
    model, tokenizer = tiny
    settings, decoder = SamplingSettings(max_new_tokens=128), DecoderSettings(backend=SCRIPT)
    agent = AgentSettings(tools=["calculator"], max_turns=max_turns)
    return evaluate_agent(model, tokenizer, rows or records(), agent, Rewards(EXACT), settings, decoder, **options)


def test_a_solved_task_counts_as_success_with_its_turns_and_calls(tiny):
    report = evaluate(tiny, batch_size=3)  # 4 prompts: a batch of 3, then one of 1
    assert (report.prompts, report.trajectories) == (4, 4)
    assert report.success_rate == 1.0 and report.mean_reward == 1.0
    assert report.mean_turns == 2.0 and report.tool_calls_per_episode == 1.0
    assert report.invalid_call_rate == 0.0 and report.finished_rate == 1.0
    assert report.success_ci == pytest.approx(wilson_interval(4, 4))
    assert report.rewards == {"exact_match": 1.0, "environment": 0.0}
    first = report.rows[0]
    answer = records(1)[0]["answer"]
    assert first["completion"] == f"The answer is {answer}." and first["fields"] == {"answer": answer}
    assert [m["role"] for m in first["conversation"]] == ["assistant", "tool", "assistant"]
    assert first["conversation"][1]["content"] == answer  # the calculator's result came back as a tool turn
    assert first["success"] is True and first["reward"] == 1.0 and first["rewards"]["exact_match"] == 1.0
    assert [r["index"] for r in report.rows] == [0, 1, 2, 3]


def test_a_wrong_final_answer_fails_although_the_tool_was_right(tiny, monkeypatch):
    monkeypatch.setenv("SCRIPT_MODE", "wrong")
    report = evaluate(tiny)
    assert report.success_rate == 0.0 and report.mean_reward == 0.0
    assert report.mean_turns == 2.0 and report.tool_calls_per_episode == 1.0 and report.invalid_call_rate == 0.0
    assert report.success_ci[0] == 0.0 and report.success_ci[1] == pytest.approx(wilson_interval(0, 4)[1])


def test_broken_calls_are_counted_as_invalid(tiny, monkeypatch):
    monkeypatch.setenv("SCRIPT_MODE", "bad_call")
    report = evaluate(tiny, max_turns=2)
    assert report.invalid_call_rate == 1.0 and report.tool_calls_per_episode == 1.0
    assert report.success_rate == 0.0
    assert report.rows[0]["conversation"][1]["content"].startswith("error: tool call 1: not valid JSON")


def test_samples_per_prompt_and_the_success_threshold(tiny):
    report = evaluate(tiny, rows=records(2), samples=2, success_threshold=1.5, batch_size=1)
    assert report.trajectories == 4 and [(r["index"], r["sample"]) for r in report.rows] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert report.mean_reward == 1.0 and report.success_rate == 0.0  # every answer right, none reaches 1.5


def test_records_that_cannot_be_evaluated_are_refused_by_index(tiny):
    model, tokenizer = tiny
    settings, decoder, agent = ONLINE_SAMPLING, DecoderSettings(backend=SCRIPT), AgentSettings(tools=["calculator"])
    with pytest.raises(ValueError, match="prompt record 1: field 'prompt'"):
        evaluate_agent(model, tokenizer, [*records(1), {"answer": "2"}], agent, Rewards(EXACT), settings, decoder)
    with pytest.raises(ValueError, match="nothing grades the answers"):
        evaluate_agent(model, tokenizer, records(1), agent, None, settings, decoder)
    with pytest.raises(ValueError, match="needs the field 'solution'"):
        rewards = Rewards([{"source": "exact_match", "options": {"field": "solution"}}])
        evaluate_agent(model, tokenizer, records(1), agent, rewards, settings, decoder)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO / "tests" / "methods"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [sys.executable, "-m", "rlft", "eval", "agent", "tiny-llama", str(TASKS), *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_the_cli_writes_a_report_whose_numbers_match(tmp_path):
    out = tmp_path / "eval"
    flags = ["--tools", "[calculator]", "--max_turns", "4", "--max_new_tokens", "128", "--reward", "exact_match"]
    flags += ["--reward_field", "answer", "--extract", "last_number", "--limit", "4", "--temperature", "0"]
    done = _cli(*flags, "--backend", SCRIPT, "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "agent.json").read_text())
    metrics = result["metrics"]
    assert result["kind"] == "agent" and result["model"] == "tiny-llama"
    assert (metrics["prompts"], metrics["success_rate"], metrics["mean_turns"]) == (4, 1.0, 2.0)
    assert (metrics["tool_calls_per_episode"], metrics["invalid_call_rate"], metrics["finished_rate"]) == (
        1.0,
        0.0,
        1.0,
    )
    assert metrics["success_ci_low"] == pytest.approx(wilson_interval(4, 4)[0])
    assert len(result["details"]["rows"]) == 4 and all(row["success"] for row in result["details"]["rows"])
    assert result["config"]["reward_options"] == {"field": "answer", "extract": "last_number"}
    assert "| success_rate | 1 |" in done.stdout and (out / "agent.md").exists()


def test_a_bad_tool_name_is_one_line_and_a_failure(tmp_path, capsys):
    from rlft.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "agent", "tiny-llama", str(TASKS), "--tools", "[calculater]", "--reward", "exact_match"])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.splitlines()
    assert error[0] == (
        "rlft eval: error: unknown tool 'calculater'; choose one of ['calculator', 'python'] or give module:function"
    )
    assert "Traceback" not in "\n".join(error)
