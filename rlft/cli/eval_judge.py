"""``rlft eval judge``: LLM-as-judge, pointwise scores or pairwise verdicts (a subcommand of :mod:`rlft.cli.eval`)."""

from __future__ import annotations

import os
from functools import partial
from typing import Literal

from rlft.cli.eval_common import finish, load_for_eval
from rlft.cli.inference import Quantization
from rlft.eval.results import make_result


def judge(
    candidate: str,
    prompts: str,
    mode: Literal["pointwise", "pairwise"] = "pointwise",
    baseline: str | None = None,
    judge_model: str | None = None,
    api_base: str | None = None,
    api_model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    limit: int | None = 20,
    max_new_tokens: int = 256,
    cache: str | None = None,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """LLM-as-judge: pointwise 1-5 scores, or pairwise candidate vs baseline judged in both orders.

    Args:
        candidate: Model string whose answers are judged.
        prompts: Prompt data in any rlft format.
        mode: "pointwise" or "pairwise" (needs `baseline`).
        baseline: Model string of the baseline for pairwise judging.
        judge_model: A local judge model string (used when `api_base` is not given).
        api_base: OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM) or https://api.openai.com/v1.
        api_model: Model name at the endpoint.
        api_key_env: Environment variable with the API key.
        limit: Use only the first N prompts.
        max_new_tokens: Answer budget of the evaluated models.
        cache: Judge cache file (default <out>/judge_cache.jsonl); re-runs reuse cached verdicts.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.compare import generate_for_policies, prompt_text
    from rlft.eval.data import load_records
    from rlft.eval.judge import Judge, LocalJudge, OpenAIJudge
    from rlft.generation.generator import Generator
    from rlft.generation.settings import SamplingSettings

    if mode == "pairwise" and not baseline:
        raise ValueError("pairwise judging needs --baseline MODEL")
    if not api_base and not judge_model:
        raise ValueError("give a judge: --judge_model MODEL (local) or --api_base URL --api_model NAME")
    if api_base and not api_model:
        raise ValueError("--api_base needs --api_model (the model name the endpoint serves)")
    prompt_list = [r["prompt"] for r in load_records(prompts, kind="prompts", limit=limit)]
    policies = {"candidate": candidate, **({"baseline": baseline} if mode == "pairwise" else {})}
    load = partial(load_for_eval, device=device, dtype=dtype, quantization=quantization)
    answers = generate_for_policies(policies, prompt_list, SamplingSettings(max_new_tokens=max_new_tokens), load=load)
    if api_base:
        backend = OpenAIJudge(api_base, api_model, api_key_env=api_key_env)
    else:
        backend = LocalJudge(Generator(*load(judge_model)), name=judge_model)
    verdicts = Judge(backend, cache_path=cache or os.path.join(out, "judge_cache.jsonl"))
    questions = [prompt_text(p) for p in prompt_list]
    if mode == "pointwise":
        metrics = verdicts.pointwise(questions, answers["candidate"])
    else:
        metrics = verdicts.pairwise(questions, answers["candidate"], answers["baseline"])
    items = metrics.pop("items")
    details = {"items": [{"prompt": q, **i} for q, i in zip(questions, items)], "answers": answers}
    config = {"mode": mode, "prompts": prompts, "judge": backend.identity, "limit": limit}
    finish(make_result("judge", candidate, metrics, config=config, details=details), out, name=f"judge_{mode}")
