"""Lightning callbacks that run an evaluation every N training steps and at the end of fit.

Each callback evaluates the in-memory model of the running method (``pl_module.model`` and
``pl_module.tokenizer``, as every rlft method has them) without touching its training state, and logs to every
active logger (CSV, TensorBoard, W&B) at the current global step. Add them in a config::

    trainer:
      callbacks:
        - class_path: rlft.callbacks.PerplexityCallback
          init_args: {data: data/val.jsonl, every_n_steps: 200, limit: 64}
        - class_path: rlft.callbacks.SampleGenerationsCallback
          init_args: {prompts: ["Write a haiku about autumn."], every_n_steps: 200}

Under several processes every rank evaluates, on the full weights (gathered for the moment under ZeRO-3 / FSDP2,
where a forward on one rank alone would wait forever for the others' shards), and global rank 0 logs: no rank
waits on another, the memory is the rollout's (one full copy of the weights per rank for the evaluation), and the
numbers equal the one-process run on the same weights. Keep evaluations small: every rank spends their time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.models.lowp import full_precision_linears
from rlft.models.modes import inference as eval_mode  # no grad, eval mode, restored after
from rlft.strategies import full_weights

log = logging.getLogger(__name__)


class EvaluationCallback(L.Callback):
    """Base class: subclasses implement :meth:`evaluate` returning ``{metric name: number}``.

    Args:
        every_n_steps: Evaluate after every N optimizer steps (0 = only at the end of fit).
        at_fit_end: Also evaluate when fit ends.
        prefix: Prefix of the logged metric names.
    """

    def __init__(self, every_n_steps: int = 0, at_fit_end: bool = True, prefix: str = "eval") -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.at_fit_end, self.prefix = every_n_steps, at_fit_end, prefix
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    #: what the evaluated network must be: ``causal_lm`` (a policy) or ``reward_model`` (a RewardModel's scorer)
    evaluates: str = "causal_lm"

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # refused at the start with the reason, not at the first evaluation steps later
        from rlft.methods import RewardModel

        trains = "reward_model" if isinstance(pl_module, RewardModel) else "causal_lm"
        if trains != self.evaluates:
            other = "RewardAccuracyCallback" if trains == "reward_model" else "PerplexityCallback or WinRateCallback"
            raise ValueError(
                f"{type(self).__name__} evaluates a {self.evaluates.replace('_', ' ')} but "
                f"{type(pl_module).__name__} trains a {trains.replace('_', ' ')}; use {other}"
            )

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        model, tokenizer = pl_module.model, pl_module.tokenizer
        # in fp32 as the run's evaluations always did, also where bf16-mixed stores frozen weights in bf16; every
        # rank on the full weights (see the module docs)
        with full_weights(pl_module), eval_mode(model), full_precision_linears(pl_module):
            metrics = self.evaluate(model, tokenizer, pl_module)
        named = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
        self.history.append((step, named))
        if trainer.is_global_zero:  # computed everywhere, logged once
            for logger in trainer.loggers:
                logger.log_metrics(named, step=step)
            log.info("step %d: %s", step, named)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # online methods take several optimiser steps per batch: evaluate when the batch crossed a multiple of N
        step, before = trainer.global_step, getattr(self, "_step_before", trainer.global_step - 1)
        if self.every_n_steps and step > 0 and step // self.every_n_steps > before // self.every_n_steps:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end:
            self._run(trainer, pl_module)
            for logger in trainer.loggers:
                logger.save()


class PerplexityCallback(EvaluationCallback):
    """Perplexity on a held-out chat/instruction file (logged as ``<prefix>/perplexity``).

    Args:
        data: Data file in any rlft SFT format.
        mode: ``assistant`` (assistant tokens only) or ``full``.
        limit: First N records only.
        batch_size: Windows per forward pass.
        max_length: Window length (default: the model's context).
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        data: str,
        mode: str = "assistant",
        limit: int | None = 64,
        batch_size: int = 4,
        max_length: int | None = None,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        from rlft.eval.data import load_records

        self.records = load_records(data, kind="sft", limit=limit)
        self.mode, self.batch_size, self.max_length = mode, batch_size, max_length

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.eval.perplexity import perplexity

        result = perplexity(
            model, tokenizer, self.records, mode=self.mode, batch_size=self.batch_size, max_length=self.max_length
        )
        return {"perplexity": result.perplexity, "nll": result.nll}


class RougeCallback(EvaluationCallback):
    """ROUGE-1/2/L F1 of greedy answers against the reference answers of an SFT file (``<prefix>/rouge1`` ...).

    Args:
        data: Data file in any rlft SFT format; the last assistant turn of each record is the reference.
        limit: First N records only.
        max_new_tokens: Answer budget.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        data: str,
        limit: int | None = 32,
        max_new_tokens: int = 64,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        from rlft.eval.data import load_records
        from rlft.eval.rouge import prompts_and_references

        self.records = load_records(data, kind="sft", limit=limit)
        prompts_and_references(self.records)  # a file without references fails here, not at the first evaluation
        self.max_new_tokens = max_new_tokens

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.eval.rouge import generated_rouge

        settings = SamplingSettings(max_new_tokens=self.max_new_tokens)  # greedy: reproducible
        return generated_rouge(Generator(model, tokenizer), self.records, settings)[0]


class RewardAccuracyCallback(EvaluationCallback):
    """Reward-model accuracy and AUROC on held-out pairs (for :class:`rlft.methods.RewardModel` training).

    Args:
        pairs: Pair file in any rlft pair format.
        limit: First N pairs only.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    evaluates = "reward_model"

    def __init__(
        self, pairs: str, limit: int | None = 128, every_n_steps: int = 0, at_fit_end: bool = True, prefix: str = "eval"
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        from rlft.eval.data import load_records

        self.pairs = load_records(pairs, kind="pairs", limit=limit)

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.eval.reward_bench import preference_accuracy
        from rlft.models.reward import RewardScorer

        # the training network itself, no copy of the weights; scoring restores its mode
        result = preference_accuracy(RewardScorer(model, tokenizer), self.pairs)
        return {"rm_accuracy": result["accuracy"], "rm_auroc": result["auroc"], "rm_margin": result["mean_margin"]}


class PassAtKCallback(EvaluationCallback):
    """HumanEval pass@1 on a small subset, run in the sandbox (logged as ``<prefix>/pass@1``).

    Args:
        limit: First N HumanEval problems.
        mode: ``chat`` or ``completion`` (see :func:`rlft.eval.humaneval.evaluate_humaneval`).
        max_new_tokens: Generation budget per problem.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        limit: int = 8,
        mode: str = "chat",
        max_new_tokens: int = 256,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        from rlft.eval.humaneval import load_problems

        self.problems = load_problems(limit=limit)
        self.mode, self.max_new_tokens = mode, max_new_tokens

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.eval.humaneval import evaluate_humaneval

        result = evaluate_humaneval(
            Generator(model, tokenizer), self.problems, mode=self.mode, max_new_tokens=self.max_new_tokens
        )
        return {"pass@1": result["pass@1"]}


class SampleGenerationsCallback(EvaluationCallback):
    """Greedy answers to fixed prompts, as a table: W&B table, TensorBoard text, and ``samples.jsonl`` in the log
    folder (CSV runs). Logs the mean answer length in words as ``<prefix>/sample_length``.

    Args:
        prompts: User messages to answer.
        max_new_tokens: Answer budget.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        if not prompts:
            raise ValueError("SampleGenerationsCallback needs at least one prompt")
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.samples: list[dict] = []

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        chats = [[{"role": "user", "content": p}] for p in self.prompts]
        answers = [s[0] for s in Generator(model, tokenizer).generate(chats, SamplingSettings(self.max_new_tokens))]
        step = pl_module.trainer.global_step
        rows = [{"step": step, "prompt": p, "response": a} for p, a in zip(self.prompts, answers)]
        self.samples += rows
        self._publish(pl_module.trainer, rows, step)
        return {"sample_length": sum(len(a.split()) for a in answers) / len(answers)}

    def _publish(self, trainer, rows: list[dict], step: int) -> None:
        if not trainer.is_global_zero:  # every rank generated the same answers; one writes them
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table(
                    key=f"{self.prefix}/samples",
                    columns=["step", "prompt", "response"],
                    data=[[r["step"], r["prompt"], r["response"]] for r in rows],
                    step=step,
                )
            elif hasattr(experiment, "add_text"):  # TensorBoard
                table = "| prompt | response |\n|---|---|\n" + "\n".join(
                    f"| {r['prompt']} | {r['response']} |".replace("\n", " ") for r in rows
                )
                experiment.add_text(f"{self.prefix}/samples", table, global_step=step)
            log_dir = getattr(logger, "log_dir", None)
            if log_dir and not hasattr(experiment, "add_text"):
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(log_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class LMEvalCallback(EvaluationCallback):
    """lm-evaluation-harness tasks on the model being trained (logged as ``<prefix>/<task>/<metric>``).

    rlft's offline tasks (``rlft_mc_basics``, ``rlft_gen_arithmetic``; :func:`rlft.eval.harness.offline_tasks`) need
    no download; other lm-eval tasks need their data sets.

    Args:
        tasks: lm-eval task names.
        limit: Documents per task.
        num_fewshot: Few-shot examples (default: the task's).
        batch_size: Requests per forward pass.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        tasks: list[str] = ["rlft_mc_basics"],  # noqa: B006 - never mutated
        limit: int | None = 20,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        if not tasks:
            raise ValueError("LMEvalCallback needs at least one task")
        self.tasks, self.limit, self.num_fewshot, self.batch_size = list(tasks), limit, num_fewshot, batch_size

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.eval.harness import run_lm_eval

        results = run_lm_eval(
            model, tokenizer, self.tasks, limit=self.limit, num_fewshot=self.num_fewshot, batch_size=self.batch_size
        )["results"]
        return {
            f"{task}/{metric}": value
            for task, metrics in results.items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
