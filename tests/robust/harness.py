"""Fault-injection harness: SIGKILL ``rlft fit`` at random points and on purpose, resume, compare with a clean run.

A run is "exact" when its exported trainable weights, its last checkpoint's weights and every logged value of the
loss curve (``train/loss``, ``val/loss`` and the method's other logged metrics, per step, as written to the CSV log)
are bit-identical to an uninterrupted run of the same config.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
# metrics that measure the machine, not the run: they differ between any two runs
UNSTABLE = ("tokens_per_sec", "seconds", "time", "epoch")


class ForkServer:
    """Client of tests/robust/forkserver.py (one warm process that forks ``rlft fit`` children)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, log: Path, fault: str | None = None) -> int:
        return self._ask({"argv": argv, "cwd": str(cwd), "log": str(log), "fault": fault})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class Method:
    name: str
    max_steps: int
    limit_train_batches: int | None  # small values put many epoch boundaries inside max_steps
    boundary_step: int  # a global step that ends an epoch: one kill lands right after its checkpoint
    steps_per_batch: int = 1  # optimiser steps per training batch (checkpoints are written per batch)
    extra: dict = field(default_factory=dict)


METHODS = {
    # 51 training rows / batch 4 = 13 batches: the natural epoch boundary at step 13
    "sft": Method("sft", max_steps=18, limit_train_batches=None, boundary_step=13),
    "rm": Method("rm", max_steps=10, limit_train_batches=3, boundary_step=6),
    "dpo": Method("dpo", max_steps=10, limit_train_batches=3, boundary_step=6),
    "grpo": Method("grpo", max_steps=8, limit_train_batches=2, boundary_step=4),
    # 2 PPO epochs x 2 minibatches = 4 optimiser steps per rollout batch; 2 batches per epoch
    "ppo": Method("ppo", max_steps=24, limit_train_batches=2, boundary_step=8, steps_per_batch=4),
}


def write_config(method: Method, run_dir: Path) -> Path:
    """The shipped tiny config, made to checkpoint every step and log to ``run_dir`` only."""
    config = yaml.safe_load((REPO / "configs" / method.name / "tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=method.max_steps, default_root_dir=str(run_dir), val_check_interval=2)
    trainer.update(limit_val_batches=1, enable_progress_bar=False, check_val_every_n_epoch=None)
    if method.limit_train_batches:
        trainer["limit_train_batches"] = method.limit_train_batches
    trainer["logger"] = [
        {
            "class_path": "rlft.callbacks.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "csv", "flush_logs_every_n_steps": 1},
        }
    ]
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "dirpath": str(run_dir / "checkpoints")},
        }
    ]
    config["model"]["init_args"]["output_dir"] = str(run_dir / "hf_model")
    data = config["data"]["init_args"]
    data["path"] = str(REPO / data["path"])
    config["model"]["init_args"].update(method.extra)
    path = run_dir.with_suffix(".yaml")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def loss_curve(run_dir: Path) -> dict[str, dict[int, str]]:
    """metric -> step -> value as logged; later processes (resumes) override what earlier ones logged."""
    curve: dict[str, dict[int, str]] = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("step"):
                    continue
                for key, value in row.items():
                    if key == "step" or not value or any(u in key for u in UNSTABLE):
                        continue
                    curve.setdefault(key, {})[int(row["step"])] = value
    return curve


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    exported = {}
    for file in sorted((run_dir / "hf_model").glob("*.safetensors")):
        exported.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    exported.update({f"ckpt:{k}": v for k, v in state.items()})
    return exported


@dataclass
class Outcome:
    kills: int = 0
    attempts: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_clean(server: ForkServer, method: Method, run_dir: Path) -> float:
    """The uninterrupted reference run; returns its median seconds per step (checkpoint write included)."""
    config = write_config(method, run_dir)
    trace = run_dir.with_suffix(".saves")
    pid = server.start(["fit", "-c", str(config)], REPO, run_dir.with_suffix(".log"), fault=f"trace:{trace}")
    status = server.wait(pid)
    if status != 0:
        raise AssertionError(f"clean {method.name} run failed ({status}):\n{run_dir.with_suffix('.log').read_text()}")
    times = [float(t) for t in trace.read_text().split()]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2]


def checkpoint_step(run_dir: Path) -> int:
    """The step a resume starts from: that of the newest readable checkpoint (what ``--ckpt_path last`` takes)."""
    steps = [0]
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        try:
            steps.append(int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]))
        except (RuntimeError, OSError, EOFError):
            continue
    return max(steps)


def concrete_fault(kind: str, method: Method, done: int, step_seconds: float, rng: random.Random) -> str | None:
    """Turn a planned fault kind into one that fires after the resume point ``done`` and before the end."""
    if kind.startswith("after_save:"):  # a fixed step
        return kind if done < int(kind.split(":")[1]) else None
    if kind == "boundary":
        return f"after_save:{method.boundary_step}" if done < method.boundary_step else None
    if kind == "random":
        # soon after the resume point, so later faults still have steps to land in; before the planned boundary
        # while it is ahead, so that one still happens
        latest = method.max_steps - 2 * method.steps_per_batch
        if done < method.boundary_step - method.steps_per_batch:
            latest = min(latest, method.boundary_step - method.steps_per_batch)
        if done + 1 > latest:
            return None
        step = rng.randint(done + 1, min(latest, done + 2 * method.steps_per_batch))
        return f"timer:{step}:{rng.uniform(0.0, 1.0) * step_seconds:.3f}"
    if kind == "mid_save":
        # a step checkpoint and last.ckpt per batch; the final batch's belong to the clean finish
        saves_left = 2 * ((method.max_steps - done) // method.steps_per_batch - 1)
        return f"mid_save:{rng.randint(1, min(saves_left, 4))}" if saves_left >= 1 else None
    if kind == "export":
        return "mid_export"
    raise ValueError(kind)


def run_with_faults(
    server: ForkServer, method: Method, run_dir: Path, plan: list[str], step_seconds: float, rng: random.Random
) -> Outcome:
    """Run the faults of ``plan`` in order, resuming with ``--ckpt_path last`` each time, then a clean finish."""
    config = write_config(method, run_dir)
    log = run_dir.with_suffix(".log")
    outcome = Outcome()
    started = time.monotonic()
    for kind in [*plan, None]:
        done = checkpoint_step(run_dir)
        fault = concrete_fault(kind, method, done, step_seconds, rng) if kind else None
        if kind and fault is None:
            outcome.attempts.append(f"{kind}:no room after step {done}")
            continue
        argv = ["fit", "-c", str(config)]
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            argv += ["--ckpt_path", "last"]
        with open(log, "a") as handle:
            handle.write(f"\n===== attempt from step {done}, fault {fault}\n")
        status = server.wait(server.start(argv, REPO, log, fault=fault))
        outcome.attempts.append(f"{fault or 'clean'}@{done}:{status}")
        if status == -9:
            outcome.kills += 1
        elif status != 0:
            raise AssertionError(f"{method.name} attempts {outcome.attempts} failed:\n{log.read_text()[-4000:]}")
        elif fault is not None:
            raise AssertionError(f"{method.name}: fault {fault} never fired ({outcome.attempts})")
    outcome.seconds = time.monotonic() - started
    return outcome


def differences(clean: Path, faulted: Path) -> list[str]:
    problems = []
    a, b = final_weights(clean), final_weights(faulted)
    if sorted(a) != sorted(b):
        problems.append(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    for key in sorted(set(a) & set(b)):
        if not torch.equal(a[key], b[key]):
            problems.append(f"{key}: max abs diff {(a[key].double() - b[key].double()).abs().max().item():.3g}")
    ca, cb = loss_curve(clean), loss_curve(faulted)
    if sorted(ca) != sorted(cb):
        problems.append(f"different metrics: {sorted(set(ca) ^ set(cb))}")
    for key in sorted(set(ca) & set(cb)):
        if ca[key] != cb[key]:
            diff = {s: (ca[key].get(s), cb[key].get(s)) for s in sorted(set(ca[key]) | set(cb[key]))}
            diff = {s: v for s, v in diff.items() if v[0] != v[1]}
            problems.append(f"{key} differs at steps {dict(list(diff.items())[:4])}")
    return problems
