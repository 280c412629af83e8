"""``scripts/bench/run.py --mode grpo|ppo``: rlft's GRPO/PPO against TRL's on the same work, one fresh process each.

Both sides get the same model, LoRA (all linear layers), prompts in the same order, group size, sampling settings
(temperature 1, no truncation), ``max_new_tokens``, beta, clip range, learning rate, per-sequence loss
aggregation (TRL ``loss_type="grpo"``) and reward: the GRPO config's arithmetic reward, computed for TRL by the same
rlft reward code, so the reward curves are comparable. Each worker reports the whole step time, the rollout time
(sampling + reference/old log-probs + rewards), generation alone and its tokens/s (real response tokens), the
update time (the rest of the step: forward, backward, optimiser), peak RSS and the reward of every step.
TRL's PPO worker is in ``bench_ppo.py`` beside this file.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import rlft

# the reward of configs/grpo/smollm2_lora.yaml: the right final number, plus a bonus for a short answer
REWARDS = [
    {"source": "exact_match", "options": {"field": "answer", "extract": "last_number"}},
    {
        "source": "regex",
        "name": "short_answer",
        "weight": 0.5,
        "options": {"pattern": r"^\S+( \S+){0,7}$", "fullmatch": True},
    },
]
PROMPTS = Path(rlft.__file__).resolve().parent / "assets" / "sample_prompts.jsonl"


def _prompts(cfg) -> list[dict]:
    rows = [json.loads(line) for line in Path(cfg.data or PROMPTS).read_text().splitlines() if line.strip()]
    needed = cfg.steps * cfg.batch_size
    if len(rows) < needed:
        raise ValueError(f"{cfg.data or PROMPTS} has {len(rows)} prompts; {needed} needed (steps x batch_size)")
    return rows[:needed]


class _Steps:
    """Per-step timings and rewards, reported the same way by both workers."""

    def __init__(self) -> None:
        self.step: list[float] = []
        self.rollout: list[float] = []
        self.generation: list[float] = []
        self.tokens: list[int] = []
        self.reward: list[float] = []
        self.completions: list[int] = []
        self._started = 0.0

    def begin(self) -> None:
        self._started = time.perf_counter()
        self.rollout.append(0.0)
        self.generation.append(0.0)
        self.tokens.append(0)
        self.completions.append(0)

    def end(self) -> None:
        self.step.append(self.elapsed())

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def result(self, warmup: int) -> dict:
        def median(values: list[float]) -> float:
            return statistics.median(values[warmup:]) if values[warmup:] else float("nan")

        timed = slice(warmup, None)
        updates = [s - r for s, r in zip(self.step, self.rollout)]
        return {
            "step_time_s": median(self.step),
            "rollout_time_s": median(self.rollout),
            "generation_time_s": median(self.generation),
            "update_time_s": median(updates),
            "rollout_tokens_per_sec": sum(self.tokens[timed]) / max(sum(self.generation[timed]), 1e-9),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rewards": [round(r, 4) for r in self.reward],
            "completions": self.completions,
            "response_tokens": self.tokens,
        }


def run_rlft(cfg, variant: str, workdir: Path) -> dict:
    import lightning as L

    from rlft.data import PreferenceDataModule
    from rlft.methods import GRPO, PPO, OptimizerSettings
    from rlft.models import LoraSettings

    options = set(variant.split("+"))
    steps = _Steps()
    data_file = workdir / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in _prompts(cfg)))

    class Timed(GRPO if cfg.mode == "grpo" else PPO):
        trim_heap_each_step = "notrim" not in options

        def rollout(self, batch):
            started = time.perf_counter()
            rollout = super().rollout(batch)
            steps.generation[-1] += rollout.generation_seconds
            steps.tokens[-1] += int(rollout.response_mask.sum())
            steps.completions[-1] += len(rollout)
            steps.rollout[-1] += time.perf_counter() - started
            return rollout

        def score(self, rollout, stage="train"):
            started = time.perf_counter()
            raw, metrics = super().score(rollout, stage)  # the raw rewards [N] and the reward's named metrics
            steps.rollout[-1] += time.perf_counter() - started
            steps.reward.append(float(raw.mean()))
            return raw, metrics

    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
    decoder = {
        "backend": "hf" if "hfgen" in options else "rlft",
        "merge_adapter": "nomerge" not in options,
        "lean_step": "nolean" not in options,
        "free_twin": True if "freetwin" in options else None,
        "decode_dtype": "bfloat16" if "bf16decode" in options else None,
    }
    if cfg.mode == "grpo":
        method = dict(group_size=cfg.group_size, kl={"coef": cfg.beta}, loss_aggregation="sequence")
    else:  # one minibatch per rollout, so one optimiser step per PPO epoch (as TRL's num_mini_batches=1)
        method = dict(
            kl={"coef": cfg.beta, "estimator": "k1"},
            epochs=cfg.ppo_epochs,
            clip_range_value=0.2,
            vf_coef=0.1,
            gamma=1.0,
            lam=0.95,
            missing_eos_penalty=1.0,
            max_grad_norm=None,
            critic=cfg.model if "critic" in options else None,
        )
    module = Timed(
        model=cfg.model,
        lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0),
        optim=OptimizerSettings(lr=cfg.lr, scheduler="constant"),
        output_dir=str(workdir / "out"),
        rewards=REWARDS,
        sampling=sampling,
        decoder=decoder,
        share_prompts="noshare" not in options,
        clip_range=0.2,
        **method,
        gradient_checkpointing="selective" if "sgc" in options else "gc" in options,
        frozen_weights_bf16="fp32base" not in options,
    )
    data = PreferenceDataModule(
        path=str(data_file), batch_size=cfg.batch_size, max_length=cfg.max_length, val_fraction=0.0, shuffle=False
    )

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.end()

    updates = cfg.steps * (cfg.ppo_epochs if cfg.mode == "ppo" else 1)  # PPO's max_steps counts optimiser steps
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=updates,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        precision="bf16-mixed" if "bf16" in options else "32-true",
        callbacks=[Timing()],
    )
    trainer.fit(module, data)
    return steps.result(cfg.warmup)


def run_trl(cfg, variant: str, workdir: Path) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    from rlft.models import resolve_model
    from rlft.rl.rewards import Rewards

    options = set(variant.split("+"))
    path = resolve_model(cfg.model).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    lora = peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in _prompts(cfg)]
    rewards = Rewards(REWARDS)
    steps = _Steps()

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        total, _ = rewards(prompts, texts, {"answer": list(answer)})
        values = [float(v) for v in total]
        steps.reward.append(statistics.fmean(values))
        return values

    args = trl.GRPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=cfg.batch_size * cfg.group_size,
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=cfg.beta,
        epsilon=0.2,
        loss_type="grpo",
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        max_steps=cfg.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        shuffle_dataset=False,
        gradient_checkpointing="nogc" not in options,
        disable_dropout=True,
        bf16="bf16" in options,  # TRL defaults to True; the bench's default is fp32 on both sides
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=lora,
    )
    generate, rollout = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        started = time.perf_counter()
        completion_ids, logprobs = generate(*a, **k)
        steps.generation[-1] += time.perf_counter() - started
        steps.tokens[-1] += sum(len(ids) for ids in completion_ids)
        steps.completions[-1] += len(completion_ids)
        return completion_ids, logprobs

    def timed_rollout(*a, **k):
        started = time.perf_counter()
        out = rollout(*a, **k)
        steps.rollout[-1] += time.perf_counter() - started
        return out

    trainer._generate_single_turn, trainer._generate_and_score_completions = timed_generate, timed_rollout

    class Timing(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.begin()

        def on_step_end(self, args, state, control, **kwargs):
            steps.end()

    trainer.add_callback(Timing())
    trainer.train()
    return steps.result(cfg.warmup)


def print_summary(cfg, results: list[dict]) -> None:
    """Medians per framework/variant and ratios against the first TRL variant (lower time is better)."""

    def median(key: tuple[str, str], field: str) -> float:
        return statistics.median(r[field] for r in results if (r["framework"], r["variant"]) == key)

    base = (results[0]["framework"], results[0]["variant"])  # ratios vs the first run (TRL's first)
    work = f"x group {cfg.group_size}" if cfg.mode == "grpo" else f"x {cfg.ppo_epochs} PPO epochs"
    print(
        f"\n{cfg.mode.upper()} {cfg.model}, {cfg.batch_size} prompts {work}, {cfg.max_new_tokens} new tokens, LoRA "
        f"r={cfg.lora_r} (medians of {cfg.repeats}; ratios vs {base[0]}/{base[1]})"
    )
    print(
        f"{'framework/variant':<24}{'step s':>8}{'rollout s':>10}{'gen tok/s':>10}{'update s':>9}{'RSS GB':>8}"
        f"{'step x':>8}{'memory x':>9}  reward first -> last"
    )
    seen: list[tuple[str, str]] = []
    for r in results:
        key = (r["framework"], r["variant"])
        if key in seen:
            continue
        seen.append(key)
        curves = [x["rewards"] for x in results if (x["framework"], x["variant"]) == key]
        first = statistics.fmean(c[0] for c in curves)
        last = statistics.fmean(statistics.fmean(c[-3:]) for c in curves)
        print(
            f"{'/'.join(key):<24}{median(key, 'step_time_s'):>8.2f}{median(key, 'rollout_time_s'):>10.2f}"
            f"{median(key, 'rollout_tokens_per_sec'):>10.1f}{median(key, 'update_time_s'):>9.2f}"
            f"{median(key, 'peak_rss_mb') / 1024:>8.2f}"
            f"{median(key, 'step_time_s') / median(base, 'step_time_s'):>8.2f}"
            f"{median(key, 'peak_rss_mb') / median(base, 'peak_rss_mb'):>9.2f}"
            f"  {first:.3f} -> {last:.3f}"
        )
