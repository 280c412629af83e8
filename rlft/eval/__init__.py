"""rlft's evaluation suite: the Python API behind ``rlft eval``.

    from rlft.eval import perplexity, evaluate_humaneval, load_problems
    from rlft.generation import Generator, SamplingSettings  # sampling is its own layer
    ppl = perplexity(model, tokenizer, records, mode="assistant").perplexity

Names are imported lazily so ``import rlft.eval`` stays cheap.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it (a bare name is a module of rlft.eval)
_EXPORTS = {
    "perplexity": "perplexity",
    "PerplexityResult": "perplexity",
    "multiple_choice_accuracy": "accuracy",
    "generative_accuracy": "accuracy",
    "extract_answer": "accuracy",
    "evaluate_humaneval": "humaneval",
    "load_problems": "humaneval",
    "run_lm_eval": "harness",
    "offline_tasks": "harness",
    "preference_accuracy": "reward_bench",
    "policy_report": "reward_bench",
    "load_reward_scorer": "reward_bench",
    "RewardModelScorer": "reward_bench",
    "refusal_rate": "reward_bench",
    "generate_for_policies": "compare",
    "summarize_policies": "compare",
    "Judge": "judge",
    "LocalJudge": "judge",
    "OpenAIJudge": "judge",
    "build_report": "report",
    "write_result": "results",
    "make_result": "results",
    "load_records": "data",
    "pass_at_k": "rlft.metrics",
    "win_rate": "rlft.metrics",
    "auroc": "rlft.metrics",
    "distinct_n": "rlft.metrics",
    "self_bleu": "rlft.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlft.eval' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"rlft.eval.{module}"), name)
