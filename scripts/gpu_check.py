"""The checks behind scripts/gpu_check.sh; each runs in its own process with a time limit, and the report says
for every check whether it ran, was skipped (and why) or failed (with the end of its log).

Checks: bf16 SFT and DPO tokens/s and peak GPU memory vs TRL on the same work (``rlft bench``); MFU of an SFT and a
DPO step on a 1B-class Llama-shaped random-init model; a QLoRA 4-bit step; ZeRO-2, ZeRO-3 and FSDP2 single-GPU runs
with the export round trip (the adapter reloads with plain peft); GRPO rollout tokens/s; GRPO with vLLM
colocated rollouts (when vLLM is installed). ``--dry-run`` runs the
parts that need no GPU on tiny models on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks

MFU_SNIPPET = r"""
import json, sys, time, torch, transformers
from rlft.logprobs import hidden_logps
cfg = json.loads(sys.argv[1])
config = transformers.LlamaConfig(**cfg["config"])
device = cfg["device"]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = transformers.LlamaForCausalLM(config).to(device, dtype)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
batch, length = cfg["batch"], cfg["length"]
rows = batch * (2 if cfg["mode"] == "dpo" else 1)  # a DPO step scores chosen and rejected
ids = torch.randint(0, config.vocab_size, (rows, length), device=device)
def step():
    hidden = model.model(input_ids=ids).last_hidden_state
    logps = hidden_logps(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, ids[:, 1:].flatten())
    loss = -logps.mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(2): step()
if device == "cuda": torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(cfg["steps"]): step()
if device == "cuda": torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / cfg["steps"]
params = sum(p.numel() for p in model.parameters())
tokens = rows * length
# 6N per token for forward+backward, +2N for the recomputed forward of gradient checkpointing, + attention scores
attention = 12 * config.num_hidden_layers * config.hidden_size * length * tokens
flops = 8 * params * tokens + attention
peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
result = {"step_seconds": seconds, "tokens_per_sec": tokens / seconds, "flops_per_sec": flops / seconds,
          "params": params, "peak_gpu_gb": peak}
print("RESULT " + json.dumps(result))
"""

ROUND_TRIP_SNIPPET = r"""
import sys, torch, peft
from transformers import AutoModelForCausalLM
from rlft.models import resolve_model
base = AutoModelForCausalLM.from_pretrained(resolve_model(sys.argv[1]).path)
model = peft.PeftModel.from_pretrained(base, sys.argv[2])
trained = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
assert trained > 0, "exported adapter is empty"
print("RESULT {\"adapter_lora_b_abs_sum\": %r}" % trained)
"""


def run(cmd: list[str], timeout: int) -> dict:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout} s", "seconds": timeout}
    result = {"seconds": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        return {**result, "status": "failed", "error": (proc.stderr or proc.stdout)[-3000:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result.update(json.loads(lines[-1].removeprefix("RESULT ")) if lines else {})
    return {**result, "status": "ok", "log_tail": proc.stdout[-1500:] if not lines else ""}


def fit(config: str, overlay: str | None, out: Path, device: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "rlft", "fit", "-c", config]
    if overlay:
        cmd += ["-c", overlay]
    accel = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1"]
    precision = ["--trainer.precision", "bf16-mixed" if device == "cuda" else "32-true"]
    return (
        cmd
        + accel
        + precision
        + [
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger",
            "false",
            "--model.init_args.output_dir",
            str(out / "hf_model"),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )


def _logged(folder: Path, name: str) -> list[float]:
    """Every value of ``name`` in the CSV metrics under ``folder``."""
    import csv

    values = []
    for path in folder.glob("**/metrics.csv"):
        with open(path) as f:
            values += [float(r[name]) for r in csv.DictReader(f) if r.get(name)]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "gpu_report")
    parser.add_argument("--dry-run", action="store_true", help="CPU-safe parts only, tiny models")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    report = {"device": gpu or "cpu", "torch": torch.__version__, "dry_run": args.dry_run, "checks": {}}
    checks = report["checks"]
    no_gpu = {"status": "skipped", "error": "no CUDA GPU (dry run)"}

    # 1. rlft vs TRL, bf16, same work
    for mode in ("sft", "dpo"):
        if not cuda:
            checks[f"bench_{mode}"] = no_gpu
            continue
        checks[f"bench_{mode}"] = run(
            [
                sys.executable,
                "scripts/bench/run.py",
                "--mode",
                mode,
                "--steps",
                "6",
                "--repeats",
                "1",
                "--batch_size",
                "8",
                "--max_length",
                "512",
            ],
            150,
        )

    # 2. MFU on a 1B-class Llama shape (tiny on CPU)
    shape = (
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        )
        if cuda
        else dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        )
    )
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in gpu), None)
    for mode in ("sft", "dpo"):
        cfg = {
            "config": shape,
            "device": device,
            "mode": mode,
            "batch": 4 if cuda else 2,
            "length": 1024 if cuda else 64,
            "steps": 5 if cuda else 2,
        }
        result = run([sys.executable, "-c", MFU_SNIPPET, json.dumps(cfg)], 180)
        if result["status"] == "ok" and peak:
            result["mfu"] = result["flops_per_sec"] / peak
        checks[f"mfu_{mode}"] = result

    # 3. QLoRA 4-bit step
    if cuda:
        qlora = ["--model.init_args.quantization", "4bit", "--trainer.max_steps", "3"]
        checks["qlora_4bit"] = run(
            fit(str(REPO / "configs/sft/tiny.yaml"), None, args.out / "qlora", device, qlora), 120
        )
    else:
        checks["qlora_4bit"] = no_gpu

    # 3b. fp16 mixed precision (loss scaling; CUDA only)
    if cuda:
        fp16 = ["--trainer.precision", "16-mixed", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]
        checks["fp16_sft"] = run(fit(str(REPO / "configs/sft/tiny.yaml"), None, args.out / "fp16", device, fp16), 120)
    else:
        checks["fp16_sft"] = no_gpu

    # 4. ZeRO-2, ZeRO-3, FSDP2 on one device with an evaluation callback (the composition that hung under sharding),
    # then the exported adapter reloads with plain peft
    for name, overlay in (("zero2", "deepspeed_zero2"), ("zero3", "deepspeed_zero3"), ("fsdp", "fsdp")):
        out = args.out / name
        callback = ["--trainer.callbacks+=rlft.callbacks.PerplexityCallback", "--trainer.callbacks.data",
                    str(REPO / "rlft/assets/sample_sft.jsonl"), "--trainer.callbacks.limit", "4",
                    "--trainer.callbacks.every_n_steps", "2", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                    "--trainer.logger.init_args.save_dir", str(out)]  # fmt: skip
        result = run(
            fit(
                str(REPO / "configs/sft/tiny.yaml"),
                str(REPO / f"configs/trainer/{overlay}.yaml"),
                out,
                device,
                ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", *callback],
            ),
            240,
        )
        if result["status"] == "ok":
            result["eval_perplexity"] = _logged(out, "eval/perplexity")
            if not result["eval_perplexity"]:
                result = {**result, "status": "failed", "error": "no eval/perplexity logged by the callback"}
        if result["status"] == "ok":
            result["round_trip"] = run(
                [sys.executable, "-c", ROUND_TRIP_SNIPPET, "tiny-llama", str(out / "hf_model")], 60
            )
        checks[name] = result

    # 5. GRPO rollouts
    grpo = args.out / "grpo"
    result = run(
        fit(
            str(REPO / "configs/grpo/tiny.yaml"),
            None,
            grpo,
            device,
            [
                "--trainer.max_steps",
                "3",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger",
                "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.init_args.save_dir",
                str(grpo),
            ],
        ),
        180,
    )
    if result["status"] == "ok":
        import csv
        import statistics

        rates = []
        for path in grpo.glob("**/metrics.csv"):
            with open(path) as f:
                rates += [
                    float(r["train/rollout_tokens_per_sec"])
                    for r in csv.DictReader(f)
                    if r.get("train/rollout_tokens_per_sec")
                ]
        if not rates:
            result = {**result, "status": "failed", "error": "no train/rollout_tokens_per_sec logged"}
        else:
            result["rollout_tokens_per_sec_median"] = statistics.median(rates)
    checks["grpo_rollouts"] = result

    # 6. GRPO with rollouts through vLLM colocated on the training GPU (weights pushed every step)
    import importlib.util

    if not cuda:
        checks["grpo_vllm_colocate"] = no_gpu
    elif importlib.util.find_spec("vllm") is None:
        checks["grpo_vllm_colocate"] = {"status": "skipped", "error": "vLLM is not installed"}
    else:
        extra = [
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--model.init_args.decoder.backend",
            "vllm",
        ]
        grpo_vllm = fit(str(REPO / "configs/grpo/tiny.yaml"), None, args.out / "grpo_vllm", device, extra)
        checks["grpo_vllm_colocate"] = run(grpo_vllm, 300)

    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# rlft GPU check — {report['device']} (torch {report['torch']}{', dry run' if args.dry_run else ''})",
        "",
        "| check | status | seconds | numbers |",
        "|---|---|---:|---|",
    ]
    for name, result in checks.items():
        numbers = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.items()
            if k not in ("status", "seconds", "error", "log_tail", "round_trip")
        )
        if "round_trip" in result:
            numbers += f" round_trip={result['round_trip']['status']}"
        lines.append(
            f"| {name} | {result['status']} | {result.get('seconds', '')} | {numbers or result.get('error', '')[:80]} |"
        )
    (args.out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [name for name, result in checks.items() if result["status"] == "failed"]
    if failed:
        print(f"gpu_check: failed: {failed} (details in {args.out / 'gpu_report.json'})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
