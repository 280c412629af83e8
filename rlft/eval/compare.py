"""Policy comparison: several models (base / SFT / DPO / PPO ...) answer the same prompts, then reward-model scores,
win rates against a baseline with bootstrap confidence intervals, diversity and length statistics.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from rlft.eval.reward_bench import refusal_rate
from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.metrics import diversity, length_stats, outcomes_from_scores, win_rate
from rlft.models.scorer import ExchangeScorer

Prompt = str | list[dict]


def prompt_text(prompt: Prompt) -> str:
    """The last user message of a prompt (what a judge or a table shows)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def generate_for_policies(
    policies: Mapping[str, str],
    prompts: Sequence[Prompt],
    settings: SamplingSettings,
    *,
    load: Callable[[str], tuple] | None = None,
) -> dict[str, list[str]]:
    """Generate one answer per prompt from each policy, loading one model at a time to bound memory.

    Args:
        policies: ``{name: model string}``, e.g. ``{"base": "smollm2-135m-instruct", "dpo": "runs/dpo/hf_model"}``.
        prompts: Shared prompts (message lists or strings).
        settings: Sampling settings (``num_samples`` is forced to 1).
        load: ``model string -> (model, tokenizer)``; default rlft's loaders.
    """
    if load is None:
        from rlft.models import load_model, load_tokenizer

        def load(name: str) -> tuple:
            return load_model(name, trainable_adapter=False), load_tokenizer(name)

    single = replace(settings, num_samples=1)
    generations = {}
    for name, model_string in policies.items():
        model, tokenizer = load(model_string)
        generations[name] = [s[0] for s in Generator(model, tokenizer).generate(list(prompts), single)]
        del model
        gc.collect()
    return generations


def summarize_policies(
    prompts: Sequence[Prompt],
    generations: Mapping[str, Sequence[str]],
    *,
    baseline: str,
    scorer: ExchangeScorer | None = None,
    tie_margin: float = 0.0,
    n_bootstrap: int = 2000,
    seed: int = 0,
    examples: int = 5,
) -> dict:
    """Metrics per policy and win rates against ``baseline``.

    Win rates come from reward-model scores per prompt (win if the reward beats the baseline's by more than
    ``tie_margin``); without a scorer only diversity/length/refusal statistics are reported (use
    :meth:`rlft.eval.judge.Judge.pairwise` for judge-based win rates).

    Returns:
        ``{"baseline", "policies": {name: {...}}, "examples": [{"prompt", name: text, ...}]}``.
    """
    if baseline not in generations:
        raise ValueError(f"baseline {baseline!r} is not one of the policies {sorted(generations)}")
    for name, texts in generations.items():
        if len(texts) != len(prompts):
            raise ValueError(f"policy {name!r} has {len(texts)} generations for {len(prompts)} prompts")
    rewards = {n: scorer.score_exchanges(prompts, t) for n, t in generations.items()} if scorer else {}
    policies = {}
    for name, texts in generations.items():
        entry: dict = {
            "length_words": length_stats([len(t.split()) for t in texts]),
            "length_chars": length_stats([len(t) for t in texts]),
            "diversity": diversity(texts),
            "refusal_rate": refusal_rate(texts),
        }
        if scorer is not None:
            entry["mean_reward"] = float(np.mean(rewards[name]))
            entry["std_reward"] = float(np.std(rewards[name]))
            if name != baseline:
                outcomes = outcomes_from_scores(rewards[name], rewards[baseline], tie_margin=tie_margin)
                entry["win_rate"] = win_rate(outcomes, n_bootstrap=n_bootstrap, seed=seed).to_dict()
        policies[name] = entry
    shown = [
        {"prompt": prompt_text(p), **{n: generations[n][i] for n in generations}}
        for i, p in enumerate(prompts[:examples])
    ]
    if scorer is not None:
        for i, row in enumerate(shown):
            row["rewards"] = {n: rewards[n][i] for n in generations}
    return {"baseline": baseline, "n_prompts": len(prompts), "policies": policies, "examples": shown}
