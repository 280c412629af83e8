"""Run lm-evaluation-harness tasks on an in-memory model through lm-eval's own model API (``HFLM``).

rlft ships offline task definitions in ``rlft/eval/tasks/`` (``rlft_mc_basics``: multiple choice by log-likelihood;
``rlft_gen_arithmetic``: generation + regex answer extraction) whose data are local JSONL files, so the harness runs
without the hub. Any other lm-eval task works too when its data set is available (cached or reachable).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def offline_tasks() -> list[str]:
    """Names of the task definitions rlft ships (usable without network)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def prepare_model(model, *, merge_adapter: bool):
    """The model lm-eval should see: a PEFT model as is (adapter active) or a merged copy.

    Merging works on a deep copy, because ``merge_and_unload`` changes the base weights in place and the caller's
    model may still be training.
    """
    if merge_adapter and hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _clean_metrics(task_results: dict) -> dict:
    """``{"acc,none": 0.5, "acc_stderr,none": ...}`` -> ``{"acc": 0.5, "acc_stderr": ...}`` (first filter wins)."""
    out = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name in ("none", "") else f"{metric}[{filter_name}]"
        out[name] = float(value)
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    merge_adapter: bool = False,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    include_path: str | Path | None = None,
    log_samples: bool = False,
    seed: int = 0,
) -> dict:
    """Evaluate ``model`` on lm-eval tasks.

    Args:
        model: A loaded causal LM (``PreTrainedModel`` or ``PeftModel``), e.g. the model being trained.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names; rlft's offline tasks (:func:`offline_tasks`) are always registered.
        limit: Evaluate only this many documents per task (a float < 1 is a fraction).
        num_fewshot: Few-shot examples (``None`` uses the task's default).
        batch_size: Requests per forward pass.
        merge_adapter: Merge a LoRA adapter into a copy of the weights before evaluating.
        apply_chat_template: Wrap prompts in the tokenizer's chat template.
        max_length: Context length lm-eval may use (default: from the model config).
        include_path: An extra folder of task YAMLs.
        log_samples: Keep per-document samples in the result (under ``"samples"``).
        seed: Seed for lm-eval's sampling/few-shot selection.

    Returns:
        ``{"results": {task: {metric: value}}, "versions": {...}, "n_samples": {...}}`` (+ ``samples``).

    Raises:
        ImportError: lm-eval is not installed.
        ValueError: A task name lm-eval does not know.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("lm-eval tasks need the `lm-eval` package: pip install 'rlft[eval]'") from error
    own_unknown = [t for t in tasks if t.startswith("rlft_") and t not in offline_tasks()]
    if own_unknown and not include_path:  # rlft's names are all known without indexing lm-eval's catalogue
        raise ValueError(f"unknown rlft task(s) {own_unknown}; rlft's offline tasks: {offline_tasks()}")
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    # indexing lm-eval's thousands of built-in task YAMLs takes tens of seconds: only do it when needed
    own = set(offline_tasks())
    if include_path:
        own |= {p.stem for p in Path(include_path).rglob("*.yaml")}
    manager = TaskManager(include_path=paths, include_defaults=not set(tasks) <= own)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval does not know the task(s) {unknown}. rlft's offline tasks: {offline_tasks()}; "
            "`lm-eval ls tasks` lists the rest (most need their data set from the hub)."
        )
    evaluated = prepare_model(model, merge_adapter=merge_adapter)
    was_training = evaluated.training
    evaluated.eval()
    kwargs = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=evaluated, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        evaluated.train(was_training)
    result = {
        "results": {task: _clean_metrics(values) for task, values in output["results"].items()},
        "versions": {k: str(v) for k, v in output.get("versions", {}).items()},
        "n_samples": {
            k: v.get("effective", v) if isinstance(v, dict) else v for k, v in output.get("n-samples", {}).items()
        },
    }
    if log_samples:
        result["samples"] = output.get("samples", {})
    return result
