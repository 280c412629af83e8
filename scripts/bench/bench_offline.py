"""Offline workers of ``scripts/bench/run.py`` (``sft``, ``dpo``, ``rm``): one framework, one variant, in this process.

Both sides get the same model, the same examples (in the same order: no shuffling), the same LoRA (all linear
layers), batch size and maximum length; each reports real (non-pad) tokens per second over the timed steps, peak
RSS and GPU memory, and its step-0 loss (the losses must agree before the speeds mean anything).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import rlft

# the real data sits beside the checkout (../shared/data); rlft's own sample data ships in the package
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ASSETS = Path(rlft.__file__).resolve().parent / "assets"
DEFAULT_DATA = {
    "sft": [SHARED / "alpaca_seed_tasks.jsonl", ASSETS / "sample_sft.jsonl"],
    "dpo": [SHARED / "hh_rlhf_harmless_sample.jsonl", ASSETS / "sample_pairs.jsonl"],
}
DEFAULT_DATA["rm"] = DEFAULT_DATA["dpo"]
KIND = {"sft": "sft", "dpo": "pairs", "rm": "pairs"}


def _data_path(cfg) -> str:
    if cfg.data:
        return cfg.data
    found = next((p for p in DEFAULT_DATA[cfg.mode] if p.exists()), None)
    if found is None:
        tried = ", ".join(map(str, DEFAULT_DATA[cfg.mode]))
        raise FileNotFoundError(f"none of the default data files exists ({tried}); pass --data FILE")
    return str(found)


def _records(cfg) -> list[dict]:
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
        raise ValueError(
            f"{_data_path(cfg)} has {len(records)} usable examples{fit}; {needed} needed (steps x batch_size)"
        )
    return records[:needed]


def _pair_fits(tokenizer, record: dict, max_length: int) -> bool:
    return all(
        len(
            tokenizer.apply_chat_template(
                record["prompt"] + [{"role": "assistant", "content": record[side]}], tokenize=True, return_dict=False
            )
        )
        <= max_length
        for side in ("chosen", "rejected")
    )


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


def run_rlft(cfg, variant: str, workdir: Path) -> dict:
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
    common = dict(
        model=cfg.model,
        lora=lora,
        optim=optim,
        output_dir=str(workdir / "out"),
        gradient_checkpointing="selective" if "sgc" in options else "gc" in options,
        frozen_weights_bf16="fp32base" not in options,
    )
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
    data = PreferenceDataModule(
        path=str(data_file),
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        val_fraction=0.0,
        packing="packing" in options,
        shuffle=False,
    )
    timer = _StepTimer()

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.stop(count_tokens(batch))
            if timer.first_loss is None:
                timer.first_loss = float(outputs["loss"])

    accelerator = "gpu" if _cuda() else "cpu"
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="bf16-mixed" if _cuda() or "bf16" in options else "32-true",
        default_root_dir=str(workdir),
        callbacks=[Timing()],
    )
    trainer.fit(module, data)
    return timer.result(cfg.warmup)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_trl(cfg, variant: str, workdir: Path) -> dict:
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
    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="SEQ_CLS" if cfg.mode == "rm" else "CAUSAL_LM",
        modules_to_save=["score"] if cfg.mode == "rm" else None,
    )
    records = _records(cfg)
    common = dict(
        output_dir=str(workdir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=cfg.max_length,
        bf16=_cuda() or "bf16" in options,
        use_cpu=not _cuda(),
        dataloader_drop_last=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        gradient_checkpointing="nogc" not in options,
    )  # TRL's default is on
    if cfg.mode == "sft":
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
        args = trl.SFTConfig(**common, packing="packing" in options)
        trainer_cls = trl.SFTTrainer
    else:
        rows = [
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
        if cfg.mode == "rm":
            args = trl.RewardConfig(**common)
            trainer_cls = trl.RewardTrainer
        else:
            args = trl.DPOConfig(**common, beta=cfg.beta, precompute_ref_log_probs="precomputed" in options)
            trainer_cls = trl.DPOTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
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
