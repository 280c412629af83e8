"""``rlft bench``: rlft against TRL on identical work, each run in a fresh process, A/B interleaved.

Both sides get the same model, the same examples (in the same order: no shuffling), the same LoRA (all linear
layers), batch size and maximum length. Each worker prints one JSON line: real (non-pad) tokens per second over the
timed steps (the first ``warmup`` steps are excluded), peak RSS, peak GPU memory, and its step-0 loss — the
losses must agree before the speeds mean anything.

    rlft bench --mode dpo --steps 4 --repeats 2
    rlft bench --mode sft --trl_variants [default,packing] --rlft_variants [default,packing]
    rlft bench --mode grpo --steps 6 --rlft_variants [default,hfgen] --trl_variants [default,nogc]

``--mode grpo`` compares online GRPO (rollout, update and whole-step time, reward curves; see
:mod:`rlft.cli.bench_online`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from rlft.cli import bench_online

# the real data sits beside the checkout (../shared/data); rlft's own sample data ships in the package
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_DATA = {
    "sft": [SHARED / "alpaca_seed_tasks.jsonl", ASSETS / "sample_sft.jsonl"],
    "dpo": [SHARED / "hh_rlhf_harmless_sample.jsonl", ASSETS / "sample_pairs.jsonl"],
}
DEFAULT_DATA["rm"] = DEFAULT_DATA["dpo"]
KIND = {"sft": "sft", "dpo": "pairs", "rm": "pairs"}
# the options a variant may combine with "+", per framework and offline/online (anything else is a typo, refused)
VARIANT_OPTIONS = {
    ("rlft", False): {"default", "packing", "precomputed", "gc", "noshare", "bf16"},
    ("rlft", True): {"default", "gc", "hfgen", "nomerge", "noshare", "bf16decode"},
    ("trl", False): {"default", "packing", "precomputed", "nogc", "bf16"},
    ("trl", True): {"default", "nogc"},
}


@dataclass
class BenchConfig:
    """What both frameworks run.

    Args:
        mode: ``sft``, ``dpo``, ``rm`` (reward model; rlft pads its pairs, so only the ``default`` variant) or
            ``grpo`` (prompts: default rlft's arithmetic prompts; ``batch_size`` prompts per step).
        model: Model string (rlft resolves it; TRL gets the resolved local folder).
        data: Data file; default: the real shared data when present, else rlft's sample data.
        batch_size: Examples (pairs for DPO) per step.
        max_length: Maximum tokens per sequence.
        steps: Optimisation steps per run, including warmup.
        warmup: Steps excluded from timing.
        repeats: Runs per framework variant (interleaved A/B).
        lora_r: LoRA rank (alpha = 2r, dropout 0, all linear layers).
        lr: Learning rate; default 1e-6 offline (the benchmark measures speed, not learning) and 2e-4 for GRPO
            (the configs' rate: both reward curves must rise).
        beta: DPO beta (default 0.1) or GRPO's KL coefficient (default 0.04).
        group_size: GRPO samples per prompt.
        max_new_tokens: GRPO response length limit.
        rlft_variants: rlft variants to run: ``default``, ``packing``, ``precomputed`` (reference), ``gc`` (gradient
            checkpointing), ``noshare`` (DPO without prompt sharing), ``bf16`` (bf16 autocast, ``precision:
            bf16-mixed``: fp32 weights and optimizer, bf16 matmuls; on a GPU every run is bf16-mixed), for GRPO
            ``hfgen`` (``model.generate`` rollouts), ``nomerge`` (peft's unmerged LoRA while decoding), ``noshare``
            (padded update forwards, each row with its own copy of the prompt) and ``bf16decode`` (a bf16 decoding
            twin), combined by ``+`` (e.g. ``precomputed+gc``).
        trl_variants: TRL variants: ``default`` (TRL turns gradient checkpointing on by default), ``packing`` (SFT
            padding-free packing), ``precomputed``, ``nogc`` (also for GRPO), ``bf16`` (``bf16=True``: autocast).
        threads: torch CPU threads per worker (0 = torch default).
    """

    mode: Literal["sft", "dpo", "rm", "grpo"] = "dpo"
    model: str = "smollm2-135m-instruct"
    data: str | None = None
    batch_size: int = 4
    max_length: int = 256
    steps: int = 4
    warmup: int = 1
    repeats: int = 2
    lora_r: int = 16
    lr: float | None = None
    beta: float | None = None
    group_size: int = 4
    max_new_tokens: int = 48
    rlft_variants: list[str] | None = None
    trl_variants: list[str] = field(default_factory=lambda: ["default"])
    threads: int = 0

    def __post_init__(self) -> None:
        online = self.mode == "grpo"
        self.lr = self.lr if self.lr is not None else (2e-4 if online else 1e-6)
        self.beta = self.beta if self.beta is not None else (0.04 if online else 0.1)
        if self.rlft_variants is None:  # packing is rlft's fastest offline setting; prompts are never packed
            self.rlft_variants = ["default"] if online else ["packing"]
        for framework, variants in (("rlft", self.rlft_variants), ("trl", self.trl_variants)):
            allowed = VARIANT_OPTIONS[framework, online]
            for variant in variants:
                unknown = set(variant.split("+")) - allowed
                if unknown:
                    raise ValueError(f"{framework} variant {variant!r}: unknown option(s) {sorted(unknown)} for "
                                     f"--mode {self.mode}; known: {sorted(allowed)}")  # fmt: skip


def _data_path(cfg: BenchConfig) -> str:
    if cfg.data:
        return cfg.data
    found = next((p for p in DEFAULT_DATA[cfg.mode] if p.exists()), None)
    if found is None:
        tried = ", ".join(map(str, DEFAULT_DATA[cfg.mode]))
        raise FileNotFoundError(f"none of the default data files exists ({tried}); pass --data FILE")
    return str(found)


def _records(cfg: BenchConfig) -> list[dict]:
    from rlft.data.formats import convert
    from rlft.data.sources import read_rows

    records, _ = convert(read_rows(_data_path(cfg)), kind=KIND[cfg.mode], on_invalid="skip")
    if cfg.mode == "sft":  # single-turn only, so TRL's completion-only loss trains exactly the tokens rlft trains
        records = [r for r in records if sum(m["role"] == "assistant" for m in r["messages"]) == 1]
    if cfg.mode == "rm":  # TRL's RewardTrainer drops over-long pairs where rlft truncates: use only pairs that fit
        from rlft.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        records = [r for r in records if _pair_fits(tokenizer, r, cfg.max_length)]
    needed = cfg.steps * cfg.batch_size
    if len(records) < needed:
        fit = f" that fit in max_length={cfg.max_length}" if cfg.mode == "rm" else ""
        raise ValueError(f"{_data_path(cfg)} has {len(records)} usable examples{fit}; {needed} needed "
                         "(steps x batch_size)")  # fmt: skip
    return records[:needed]


def _pair_fits(tokenizer, record: dict, max_length: int) -> bool:
    return all(
        len(tokenizer.apply_chat_template(record["prompt"] + [{"role": "assistant", "content": record[side]}],
                                          tokenize=True, return_dict=False)) <= max_length
        for side in ("chosen", "rejected")
    )  # fmt: skip


class _StepTimer:
    """Collects per-step wall time and real tokens (shared by both workers)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.first_loss: float | None = None
        self._start = 0.0

    def start(self) -> None:
        _sync()
        self._start = time.perf_counter()

    def stop(self, tokens: int) -> None:
        _sync()
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(tokens)

    def result(self, warmup: int) -> dict:
        times, tokens = self.times[warmup:], self.tokens[warmup:]
        gpu = 0.0
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.max_memory_allocated() / 2**20
        return {
            "tokens_per_sec": sum(tokens) / sum(times) if times else float("nan"),
            "step_time_s": statistics.mean(times) if times else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": gpu,
            "step0_loss": self.first_loss,
            "timed_steps": len(times),
        }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run_rlft(cfg: BenchConfig, variant: str, workdir: Path) -> dict:
    import lightning as L

    from rlft.data import PreferenceDataModule
    from rlft.data.collate import count_tokens
    from rlft.methods import OptimizerSettings
    from rlft.models import LoraSettings

    options = set(variant.split("+"))
    data_file = workdir / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in _records(cfg)))
    lora = LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0)
    optim = OptimizerSettings(lr=cfg.lr, scheduler="constant")
    common = dict(model=cfg.model, lora=lora, optim=optim, output_dir=str(workdir / "out"),
                  gradient_checkpointing="gc" in options)  # fmt: skip
    if cfg.mode == "sft":
        from rlft.methods import SFT

        module = SFT(**common)
    elif cfg.mode == "rm":
        from rlft.methods import RewardModel

        module = RewardModel(**common)
    else:
        from rlft.methods import DPO

        reference = "precomputed" if "precomputed" in options else "adapter"
        module = DPO(**common, beta=cfg.beta, reference=reference, share_prompts="noshare" not in options)
    data = PreferenceDataModule(path=str(data_file), batch_size=cfg.batch_size, max_length=cfg.max_length,
                                val_fraction=0.0, packing="packing" in options, shuffle=False)  # fmt: skip
    timer = _StepTimer()

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.stop(count_tokens(batch))
            if timer.first_loss is None:
                timer.first_loss = float(outputs["loss"])

    accelerator = "gpu" if _cuda() else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=cfg.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="bf16-mixed" if _cuda() or "bf16" in options else "32-true",
                        default_root_dir=str(workdir),
                        callbacks=[Timing()])  # fmt: skip
    trainer.fit(module, data)
    return timer.result(cfg.warmup)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_trl(cfg: BenchConfig, variant: str, workdir: Path) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from rlft.models import resolve_model

    options = set(variant.split("+"))
    path = resolve_model(cfg.model).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if cfg.mode == "rm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype="auto")
        model.config.pad_token_id = tokenizer.pad_token_id
        torch.nn.init.zeros_(model.score.weight)  # as rlft's head: both step-0 losses are exactly log 2
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear",
                           task_type="SEQ_CLS" if cfg.mode == "rm" else "CAUSAL_LM",
                           modules_to_save=["score"] if cfg.mode == "rm" else None)  # fmt: skip
    records = _records(cfg)
    common = dict(output_dir=str(workdir), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
                  learning_rate=cfg.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                  report_to=[], max_length=cfg.max_length, bf16=_cuda() or "bf16" in options, use_cpu=not _cuda(),
                  dataloader_drop_last=False, seed=0, data_seed=0,
                  gradient_checkpointing="nogc" not in options)  # TRL's default is on  # fmt: skip
    if cfg.mode == "sft":
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
        args = trl.SFTConfig(**common, packing="packing" in options)
        trainer_cls = trl.SFTTrainer
    else:
        rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]  # fmt: skip
        if cfg.mode == "rm":
            args = trl.RewardConfig(**common)
            trainer_cls = trl.RewardTrainer
        else:
            args = trl.DPOConfig(**common, beta=cfg.beta, precompute_ref_log_probs="precomputed" in options)
            trainer_cls = trl.DPOTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer._get_train_sampler = lambda *a, **k: None  # same order as rlft: no shuffling
    timer = _StepTimer()
    collate = trainer.data_collator
    pending: list[int] = []

    def counting_collator(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        pending.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator

    class Timing(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            timer.stop(pending.pop(0) if pending else 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if timer.first_loss is None and logs and "loss" in logs:
                timer.first_loss = float(logs["loss"])

    trainer.add_callback(Timing())
    trainer.train()
    return timer.result(cfg.warmup)


WORKERS = {"rlft": _run_rlft, "trl": _run_trl}
ONLINE_WORKERS = {"rlft": bench_online.run_rlft, "trl": bench_online.run_trl}


def _worker(argv: list[str]) -> None:
    framework, variant, raw = argv
    cfg = BenchConfig(**json.loads(raw))
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        workers = ONLINE_WORKERS if cfg.mode == "grpo" else WORKERS
        result = workers[framework](cfg, variant, Path(workdir))
    print("RLFT_BENCH " + json.dumps({"framework": framework, "variant": variant, **result}), flush=True)


def _launch(framework: str, variant: str, cfg: BenchConfig) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "rlft.cli.bench", "--worker", framework, variant, json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RLFT_BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework}/{variant} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RLFT_BENCH "))


def run(cfg: BenchConfig) -> list[dict]:
    """Run every variant ``repeats`` times, interleaved, and print a comparison table."""
    jobs = [("trl", v) for v in cfg.trl_variants] + [("rlft", v) for v in cfg.rlft_variants]
    results: list[dict] = []
    for repeat in range(cfg.repeats):
        for framework, variant in jobs if repeat % 2 == 0 else reversed(jobs):
            result = _launch(framework, variant, cfg)
            if cfg.mode == "grpo":
                detail = f"step {result['step_time_s']:6.2f} s  rewards {result['rewards']}"
            else:
                detail = f"{result['tokens_per_sec']:8.1f} tok/s  step-0 loss {result['step0_loss']:.4f}"
            print(f"  run {repeat + 1}: {framework:<4} {variant:<22} {result['peak_rss_mb'] / 1024:5.2f} GB RSS  "
                  f"{detail}", flush=True)  # fmt: skip
            results.append(result)
    (bench_online.print_summary if cfg.mode == "grpo" else _print_summary)(cfg, results)
    return results


def _print_summary(cfg: BenchConfig, results: list[dict]) -> None:
    def median(framework: str, variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results if (r["framework"], r["variant"]) == (framework, variant))

    base = ("trl", cfg.trl_variants[0])
    base_tps, base_rss = median(*base, "tokens_per_sec"), median(*base, "peak_rss_mb")
    print(f"\n{cfg.mode.upper()} {cfg.model}, batch {cfg.batch_size}, max_length {cfg.max_length}, LoRA r={cfg.lora_r}"
          f" (medians of {cfg.repeats}; ratios vs trl/{base[1]})")  # fmt: skip
    print(f"{'framework/variant':<30}{'tokens/s':>10}{'peak RSS GB':>13}{'peak GPU GB':>13}{'step-0 loss':>13}"
          f"{'speed x':>9}{'memory x':>10}")  # fmt: skip
    seen = []
    for r in results:
        key = (r["framework"], r["variant"])
        if key in seen:
            continue
        seen.append(key)
        tps, rss = median(*key, "tokens_per_sec"), median(*key, "peak_rss_mb")
        print(f"{'/'.join(key):<30}{tps:>10.1f}{rss / 1024:>13.2f}{median(*key, 'peak_gpu_mb') / 1024:>13.2f}"
              f"{median(*key, 'step0_loss'):>13.4f}{tps / base_tps:>9.2f}{rss / base_rss:>10.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="rlft bench", description=__doc__)
    parser.add_class_arguments(BenchConfig, nested_key=None)
    args = parser.parse_args(argv)
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__})
    except ValueError as error:
        parser.error(str(error))
    run(cfg)


if __name__ == "__main__":
    main()
