"""The benchmark: rlft against TRL on identical work, each run in a fresh process, A/B interleaved.

Run from a checkout, with rlft's environment (``scripts/setup_env.sh dev``: TRL is a test-only dependency, so the
harness lives beside the package, not in it): ``python scripts/bench/run.py --mode dpo ...``.

Both sides get the same model, the same examples (in the same order: no shuffling), the same LoRA (all linear
layers), batch size and maximum length. Each worker prints one JSON line: real (non-pad) tokens per second over the
timed steps (the first ``warmup`` steps are excluded), peak RSS, peak GPU memory, and its step-0 loss — the
losses must agree before the speeds mean anything.

    python scripts/bench/run.py --mode dpo --steps 4 --repeats 2
    python scripts/bench/run.py --mode sft --trl_variants [default,packing] --rlft_variants [default,packing]
    python scripts/bench/run.py --mode grpo --steps 6 --rlft_variants [default,hfgen] --trl_variants [default,nogc]
    python scripts/bench/run.py --mode ppo --batch_size 8 --steps 6 --rlft_variants [default,critic]

``--mode grpo`` and ``--mode ppo`` compare online RL (rollout, update and whole-step time, reward curves; see
``scripts/bench/bench_online.py``). TRL removed its PPO trainer in 1.13: ``--mode ppo`` runs TRL 1.12's
``trl.experimental.ppo`` from ``--trl_path`` (default ``.bench/trl-1.12``, which ``scripts/setup_env.sh`` installs
with the dev extra: ``pip install --no-deps --target .bench/trl-1.12 trl==1.12.0``; other dependencies are shared).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

# siblings: this folder is sys.path[0] when the file runs as a script (tests put it there)
import bench_offline
import bench_online
import bench_ppo

# the options a variant may combine with "+", per framework and offline/online (anything else is a typo, refused)
VARIANT_OPTIONS = {
    ("rlft", False): {"default", "packing", "precomputed", "gc", "sgc", "noshare", "bf16", "fp32base"},
    ("rlft", True): {
        "default",
        "gc",
        "sgc",
        "hfgen",
        "nomerge",
        "nolean",
        "noshare",
        "bf16decode",
        "bf16",
        "fp32base",
        "critic",
        "notrim",
        "freetwin",
    },
    ("trl", False): {"default", "packing", "precomputed", "nogc", "bf16"},
    ("trl", True): {"default", "nogc", "bf16", "loracritic"},
}
ONLINE = {"grpo", "ppo"}
# where scripts/setup_env.sh (the dev extra) puts TRL 1.12, the last TRL with a PPO trainer
TRL_PPO = Path(__file__).resolve().parents[2] / ".bench" / "trl-1.12"


@dataclass
class BenchConfig:
    """What both frameworks run.

    Args:
        mode: ``sft``, ``dpo``, ``rm`` (reward model; rlft pads its pairs, so only the ``default`` variant) or
            ``grpo``/``ppo`` (prompts: default rlft's arithmetic prompts; ``batch_size`` prompts per step).
        model: Model string (rlft resolves it; TRL gets the resolved local folder).
        data: Data file; default: the real shared data when present, else rlft's sample data.
        batch_size: Examples (pairs for DPO) per step.
        max_length: Maximum tokens per sequence.
        steps: Optimisation steps per run, including warmup.
        warmup: Steps excluded from timing.
        repeats: Runs per framework variant (interleaved A/B).
        lora_r: LoRA rank (alpha = 2r, dropout 0, all linear layers).
        lr: Learning rate; default 1e-6 offline (the benchmark measures speed, not learning) and 2e-4 online
            (the configs' rate: both reward curves must rise).
        beta: DPO beta (default 0.1), GRPO's KL coefficient (default 0.04) or PPO's (default 0.05).
        group_size: GRPO samples per prompt.
        max_new_tokens: Online response length limit.
        rlft_variants: rlft variants to run: ``default``, ``packing``, ``precomputed`` (reference), ``gc`` (gradient
            checkpointing), ``sgc`` (selective checkpointing: products kept, the rest recomputed), ``noshare`` (DPO
            without prompt sharing), ``bf16`` (``precision: bf16-mixed``: fp32 trained weights and optimizer, bf16
            matmuls under autocast, frozen weights stored in bf16 where exact; on a GPU every run is bf16-mixed),
            ``fp32base`` (with ``bf16``: frozen weights kept in fp32, cast by autocast at every call); online also
            ``hfgen`` (``model.generate`` rollouts), ``nomerge`` (peft's unmerged LoRA while decoding), ``nolean``
            (rlft's decoder stepping through the model's forward instead of its lean step), ``noshare`` (padded
            update forwards, each row with its own copy of the prompt), ``bf16decode`` (a bf16 decoding twin),
            ``freetwin`` (its weights freed through the update: ``decoder.free_twin``), ``notrim`` (freed heap
            kept between steps: ``OnlineRL.trim_heap_each_step = False``) and for PPO ``critic`` (a separate LoRA
            critic instead of a value head on the policy's trunk); combined by ``+`` (e.g. ``precomputed+gc``).
        trl_variants: TRL variants: ``default`` (fp32, gradient checkpointing on as TRL's default), ``packing`` (SFT
            padding-free packing), ``precomputed``, ``nogc``, ``bf16`` (``bf16=True``, autocast: TRL 1.16's default
            precision, which the bench's ``default`` turns off so that both sides' defaults are fp32) and for PPO
            ``loracritic`` (the value model gets the policy's LoRA; TRL's default trains all its weights).
        threads: torch CPU threads per worker (0 = torch default).
        trl_path: Folder put first on TRL workers' ``sys.path`` (``--mode ppo`` needs TRL <= 1.12, see above);
            default for ``--mode ppo``: ``.bench/trl-1.12`` beside the checkout when it exists.
        ppo_epochs: PPO passes over each rollout (one optimiser step per pass: the whole rollout is one minibatch).
        seed: Random seed of every run (initialisation, sampling); online learning curves differ between seeds.
    """

    mode: Literal["sft", "dpo", "rm", "grpo", "ppo"] = "dpo"
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
    trl_path: str | None = None
    seed: int = 0
    ppo_epochs: int = 4

    def __post_init__(self) -> None:
        online = self.mode in ONLINE
        self.lr = self.lr if self.lr is not None else (2e-4 if online else 1e-6)
        self.beta = self.beta if self.beta is not None else {"grpo": 0.04, "ppo": 0.05}.get(self.mode, 0.1)
        if self.mode == "ppo" and self.trl_path is None and (TRL_PPO / "trl").is_dir():
            self.trl_path = str(TRL_PPO)
        if self.rlft_variants is None:  # packing is rlft's fastest offline setting; prompts are never packed
            self.rlft_variants = ["default"] if online else ["packing"]
        for framework, variants in (("rlft", self.rlft_variants), ("trl", self.trl_variants)):
            allowed = VARIANT_OPTIONS[framework, online] - ({"critic", "loracritic"} if self.mode != "ppo" else set())
            for variant in variants:
                unknown = set(variant.split("+")) - allowed
                if unknown:
                    raise ValueError(
                        f"{framework} variant {variant!r}: unknown option(s) {sorted(unknown)} for "
                        f"--mode {self.mode}; known: {sorted(allowed)}"
                    )


WORKERS = {
    "sft": {"rlft": bench_offline.run_rlft, "trl": bench_offline.run_trl},
    "grpo": {"rlft": bench_online.run_rlft, "trl": bench_online.run_trl},
    "ppo": {"rlft": bench_online.run_rlft, "trl": bench_ppo.run_trl},
}
WORKERS["dpo"] = WORKERS["rm"] = WORKERS["sft"]


def _worker(argv: list[str]) -> None:
    framework, variant, raw = argv
    cfg = BenchConfig(**json.loads(raw))
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as workdir:
        result = WORKERS[cfg.mode][framework](cfg, variant, Path(workdir))
    print("RLFT_BENCH " + json.dumps({"framework": framework, "variant": variant, **result}), flush=True)


# a launcher's (or an in-process Lightning run's) rendezvous settings would make a worker join a process group
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                   "GROUP_RANK")  # fmt: skip


def _launch(framework: str, variant: str, cfg: BenchConfig) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV},
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    if framework == "trl" and cfg.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(cfg.trl_path).resolve()), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, variant, json.dumps(asdict(cfg))]
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
            if cfg.mode in ONLINE:
                detail = f"step {result['step_time_s']:6.2f} s  rewards {result['rewards']}"
            else:
                detail = f"{result['tokens_per_sec']:8.1f} tok/s  step-0 loss {result['step0_loss']:.4f}"
            print(
                f"  run {repeat + 1}: {framework:<4} {variant:<22} {result['peak_rss_mb'] / 1024:5.2f} GB RSS  "
                f"{detail}",
                flush=True,
            )
            results.append(result)
    (bench_online.print_summary if cfg.mode in ONLINE else _print_summary)(cfg, results)
    return results


def _print_summary(cfg: BenchConfig, results: list[dict]) -> None:
    def median(framework: str, variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results if (r["framework"], r["variant"]) == (framework, variant))

    base = (results[0]["framework"], results[0]["variant"])  # ratios vs the first run (TRL's first)
    base_tps, base_rss = median(*base, "tokens_per_sec"), median(*base, "peak_rss_mb")
    print(
        f"\n{cfg.mode.upper()} {cfg.model}, batch {cfg.batch_size}, max_length {cfg.max_length}, LoRA r={cfg.lora_r}"
        f" (medians of {cfg.repeats}; ratios vs {base[0]}/{base[1]})"
    )
    print(
        f"{'framework/variant':<30}{'tokens/s':>10}{'peak RSS GB':>13}{'peak GPU GB':>13}{'step-0 loss':>13}"
        f"{'speed x':>9}{'memory x':>10}"
    )
    seen = []
    for r in results:
        key = (r["framework"], r["variant"])
        if key in seen:
            continue
        seen.append(key)
        tps, rss = median(*key, "tokens_per_sec"), median(*key, "peak_rss_mb")
        print(
            f"{'/'.join(key):<30}{tps:>10.1f}{rss / 1024:>13.2f}{median(*key, 'peak_gpu_mb') / 1024:>13.2f}"
            f"{median(*key, 'step0_loss'):>13.4f}{tps / base_tps:>9.2f}{rss / base_rss:>10.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="scripts/bench/run.py", description=__doc__)
    parser.add_class_arguments(BenchConfig, nested_key=None)
    args = parser.parse_args(argv)
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__})
        if cfg.mode in ONLINE:  # too few prompts: say so before any worker starts
            bench_online._prompts(cfg)
    except ValueError as error:
        parser.error(str(error))
    run(cfg)


if __name__ == "__main__":
    main()
