"""Per-rank memory of the same SmolLM2 LoRA SFT run under DDP, ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU processes.

    python scripts/distributed_memory.py [--config configs/sft/smollm2_lora.yaml] [--steps 3] [--model M]
    python scripts/distributed_memory.py --bf16-checkpoint   # the same model saved in bf16, as hub models ship

Each run is a fresh `rlft fit` with rlft.callbacks.MemoryReport; prints, for each rank, RSS and its anonymous part
(RssAnon: what the process holds itself, without the page cache of the mmap-ed checkpoint that all ranks share)
after setup (model loaded and sharded) and during training, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    **{
        name: ["-c", str(REPO / "configs" / "trainer" / f"{name}.yaml")]
        for name in ("deepspeed_zero2", "deepspeed_zero3", "fsdp")
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "sft" / "smollm2_lora.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--model", help="model string instead of the config's")
    parser.add_argument(
        "--bf16-checkpoint",
        action="store_true",
        help="save the config's model as a bf16 checkpoint first and train from that (fp32 weights "
        "are then converted copies on every rank that loads, not the shared page cache)",
    )
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    if args.bf16_checkpoint:
        args.model = _bf16_copy(args.model or _config_model(args.config), Path(scratch.name) / "bf16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for name in args.strategies:
        with tempfile.TemporaryDirectory() as root:
            cmd = [
                sys.executable,
                "-m",
                "rlft",
                "fit",
                "-c",
                args.config,
                *STRATEGIES[name],
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "2",
                "--trainer.precision",
                "32-true",
                "--trainer.max_steps",
                str(args.steps),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger",
                "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir",
                root,
                "--trainer.default_root_dir",
                root,
                "--model.init_args.output_dir",
                f"{root}/hf_model",
                "--trainer.callbacks+=rlft.callbacks.MemoryReport",
                "--trainer.enable_progress_bar",
                "false",
            ]
            if args.model:
                cmd += ["--model.init_args.model", args.model]
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{name}: failed\n{result.stderr[-3000:]}", file=sys.stderr)
                continue
            for rank in (0, 1):
                numbers = json.loads((Path(root) / "memory" / f"rank{rank}.json").read_text())
                rows.append((name, rank, numbers))
    columns = {
        "peak_rss_mb_at_fit_start": "peak at fit start",
        "rss_mb_after_setup": "RSS after setup",
        "anon_mb_after_setup": "anon after setup",
        "rss_mb_training": "RSS training",
        "anon_mb_training": "anon training",
        "peak_rss_mb": "peak RSS",
    }
    print(f"{'strategy':<18}{'rank':>5}" + "".join(f"{title + ' MB':>20}" for title in columns.values()))
    for name, rank, n in rows:
        print(f"{name:<18}{rank:>5}" + "".join(f"{n.get(key, 0):>20.0f}" for key in columns))


def _config_model(config: str) -> str:
    import yaml

    return yaml.safe_load(Path(config).read_text())["model"]["init_args"]["model"]


def _bf16_copy(model: str, folder: Path) -> str:
    import torch

    from rlft.models import load_model, load_tokenizer

    load_model(model).to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(model).save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    main()
