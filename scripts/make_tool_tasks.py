"""Write the calculator task files shipped in rlft/assets (deterministic: the same files on every run).

* ``tool_arithmetic.jsonl``: prompts ``{"prompt", "answer"}``, products and sums of numbers too large for a small
  model to compute in its head; the reward checks the last number of the final answer.
* ``tool_arithmetic_heldout.jsonl``: 64 more prompts from another seed, for ``rlft eval agent`` before and after RL.
* ``tool_arithmetic_sft.jsonl``: TRL-style tool conversations on other numbers (a user question, an assistant turn
  calling the calculator, the tool's result, the final answer), the warm start that teaches the call format.
* ``tool_tiny*.jsonl``: a calculator task sized for the 2-layer ``tiny-llama`` (configs/sft/tools_tiny.yaml, then
  configs/grpo/agent_tiny.yaml): ``(a + b + c) % 10`` over digits 1-9, every number one token, the final answer the
  tool's one-digit result. Prompts (``tool_tiny.jsonl``), 128 held-out prompts from another seed whose triples appear
  in no other file (``tool_tiny_heldout.jsonl``), and SFT conversations without a tool list
  (``tool_tiny_sft.jsonl``: the tiny agent runs with ``show_tools: false``).

    python scripts/make_tool_tasks.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlft.rl.tools import TOOLS

ASSETS = Path(__file__).resolve().parents[1] / "rlft" / "assets"
QUESTION = "What is {a} {op} {b}? Use the calculator."


def task(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("*+")
    a, b = (
        (rng.randrange(1000, 99999), rng.randrange(100, 9999))
        if op == "*"
        else (rng.randrange(10**6, 10**9), rng.randrange(10**6, 10**9))
    )
    expression = f"{a} {op} {b}"
    return expression, str(a * b if op == "*" else a + b)


def main() -> None:
    rng = random.Random(0)
    with open(ASSETS / "tool_arithmetic.jsonl", "w") as out:
        for _ in range(256):
            expression, answer = task(rng)
            a, op, b = expression.split()
            out.write(json.dumps({"prompt": QUESTION.format(a=a, op=op, b=b), "answer": answer}) + "\n")
    with open(ASSETS / "tool_arithmetic_heldout.jsonl", "w") as out:
        heldout = random.Random(1)
        for _ in range(64):
            expression, answer = task(heldout)
            a, op, b = expression.split()
            out.write(json.dumps({"prompt": QUESTION.format(a=a, op=op, b=b), "answer": answer}) + "\n")
    with open(ASSETS / "tool_arithmetic_sft.jsonl", "w") as out:
        for _ in range(128):
            expression, answer = task(rng)
            a, op, b = expression.split()
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
            messages = [
                {"role": "user", "content": QUESTION.format(a=a, op=op, b=b)},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": answer},
                {"role": "assistant", "content": f"{expression} = {answer}"},
            ]
            out.write(json.dumps({"messages": messages, "tools": [TOOLS["calculator"].schema()]}) + "\n")
    tiny_tasks()


def tiny_tasks() -> None:
    """The tiny model's task: ``(a + b + c) % 10`` over digits 1-9; held-out triples appear in no other file."""
    heldout_rng, rng = random.Random(1), random.Random(0)
    triple = lambda r: tuple(r.randrange(1, 10) for _ in range(3))  # noqa: E731
    heldout: list[tuple[int, ...]] = []
    while len(heldout) < 128:
        if (candidate := triple(heldout_rng)) not in heldout:
            heldout.append(candidate)
    seen = set(heldout)

    def fresh(count: int) -> list[tuple[int, ...]]:
        drawn = []
        while len(drawn) < count:
            if (candidate := triple(rng)) not in seen:
                seen.add(candidate)
                drawn.append(candidate)
        return drawn

    def expression(a: int, b: int, c: int) -> str:
        return f"({a} + {b} + {c}) % 10"

    for name, triples in (("tool_tiny.jsonl", fresh(256)), ("tool_tiny_heldout.jsonl", heldout)):
        with open(ASSETS / name, "w") as out:
            for t in triples:
                record = {"prompt": f"What is {expression(*t)}?", "answer": str(sum(t) % 10)}
                out.write(json.dumps(record) + "\n")
    with open(ASSETS / "tool_tiny_sft.jsonl", "w") as out:
        for t in fresh(256):
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression(*t)}}}
            messages = [  # no `tools` field: the tiny agent runs with show_tools: false, its prompt lists none
                {"role": "user", "content": f"What is {expression(*t)}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": str(sum(t) % 10)},
                {"role": "assistant", "content": str(sum(t) % 10)},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
