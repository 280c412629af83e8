"""The design card's combinations through `rlft fit`: methods x strategies x evaluation callbacks x resume.

Twelve rows cover every pair of (callback, strategy), (callback, method), (resume, strategy) and (resume, method)
(``test_rows_cover_every_pair`` checks it); method x strategy is covered by the rows together with
``test_strategies.py`` (every method under ZeRO-2/3 and FSDP2 against one process) and ``test_ddp.py``. A row runs
the method's tiny config on 2 CPU processes (or one), with the callback evaluating every 2 optimiser steps, fresh
for 4 steps or killed-and-resumed (2 steps, then ``--ckpt_path last`` to 4). Each run is bounded by a timeout: the
failure these guard against is a hang. A callback that cannot evaluate what a method trains is refused at start.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "distributed" / "parity_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SAMPLES = REPO / "rlft" / "assets"

pytestmark = pytest.mark.slow

# (method config, strategy, callback, resume)
ROWS = [
    ("sft", "single", "perplexity", "resumed"),
    ("sft", "deepspeed_zero3", "win_rate", "fresh"),
    ("dpo", "ddp", "win_rate", "resumed"),
    ("dpo", "fsdp", "perplexity", "fresh"),
    ("rm", "deepspeed_zero2", "rm_accuracy", "fresh"),
    ("rm", "single", "rm_accuracy", "resumed"),
    ("kto", "deepspeed_zero2", "perplexity", "resumed"),
    ("kto", "single", "win_rate", "fresh"),
    ("ppo", "fsdp", "win_rate", "resumed"),
    ("grpo", "deepspeed_zero3", "perplexity", "resumed"),
    ("ppo", "ddp", "perplexity", "fresh"),
    ("grpo", "single", "win_rate", "fresh"),
]
METRIC = {"perplexity": "eval/perplexity", "win_rate": "eval/win_rate", "rm_accuracy": "eval/rm_accuracy"}


def test_rows_cover_every_pair():
    methods, strategies = {r[0] for r in ROWS}, {r[1] for r in ROWS}
    judges = {"rm": {"rm_accuracy"}}  # a reward model is judged by its accuracy; policies by perplexity / win rate
    for method in methods:
        assert {r[2] for r in ROWS if r[0] == method} == judges.get(method, {"perplexity", "win_rate"}), method
        assert {r[3] for r in ROWS if r[0] == method} == {"fresh", "resumed"}, method
    for strategy in strategies:
        assert {r[3] for r in ROWS if r[1] == strategy} == {"fresh", "resumed"}, strategy
        assert {"perplexity"} <= {r[2] for r in ROWS if r[1] == strategy}, strategy
        assert {r[2] for r in ROWS if r[1] == strategy} & {"win_rate", "rm_accuracy"}, strategy
    assert strategies == {"single", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("assets")  # an (untrained, random-head) reward model to judge win rates with
    subprocess.run(
        [sys.executable, str(WORKER), str(out), "--make-assets"],
        cwd=REPO,
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def _callback(kind: str, assets: Path) -> list[str]:
    common = ["--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.at_fit_end", "false"]
    if kind == "perplexity":
        return [
            "--trainer.callbacks+=rlft.callbacks.PerplexityCallback",
            "--trainer.callbacks.data",
            str(SAMPLES / "sample_sft.jsonl"),
            "--trainer.callbacks.limit",
            "4",
            *common,
        ]
    if kind == "win_rate":
        return [
            "--trainer.callbacks+=rlft.callbacks.WinRateCallback",
            "--trainer.callbacks.prompts",
            str(SAMPLES / "sample_prompts.jsonl"),
            "--trainer.callbacks.reward_model",
            str(assets / "rm"),
            "--trainer.callbacks.limit",
            "4",
            "--trainer.callbacks.max_new_tokens",
            "8",
            "--trainer.callbacks.n_bootstrap",
            "100",
            *common,
        ]
    return [
        "--trainer.callbacks+=rlft.callbacks.RewardAccuracyCallback",
        "--trainer.callbacks.pairs",
        str(SAMPLES / "sample_pairs.jsonl"),
        "--trainer.callbacks.limit",
        "8",
        *common,
    ]


def _fit(root: Path, method: str, strategy: str, extra: list[str], steps: int, *resume: str) -> None:
    text = (REPO / "configs" / method / "tiny.yaml").read_text().replace("rlft/assets/", f"{SAMPLES}/")
    config = root / "config.yaml"
    config.write_text(text)
    hardware = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
    if strategy != "single":
        hardware = ["-c", str(REPO / "configs" / "trainer" / f"{strategy}.yaml"), *hardware]
        hardware[hardware.index("--trainer.devices") + 1] = "2"
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(config),
        *hardware,
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.output_dir",
        str(root / "hf_model"),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks.every_n_train_steps",
        "2",
        *extra,
        *resume,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"{method} {strategy} {extra}: {result.stderr[-4000:]}"


def _logged(root: Path, name: str) -> list[int]:
    steps = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get(name)]
    return steps


@pytest.mark.parametrize(("method", "strategy", "callback", "resume"), ROWS, ids=["-".join(r) for r in ROWS])
def test_combination_trains_evaluates_and_resumes(method, strategy, callback, resume, assets, tmp_path):
    extra = _callback(callback, assets)
    if method == "ppo":  # one optimiser step per rollout, so "4 steps" means 4 batches here too
        extra += ["--model.init_args.epochs", "1", "--model.init_args.minibatch_size", "null"]
    if resume == "resumed":  # the first run stops at step 2 as if killed there; the second resumes its last.ckpt
        _fit(tmp_path, method, strategy, extra, 2)
        assert (tmp_path / "checkpoints" / "last.ckpt").exists()
        _fit(tmp_path, method, strategy, extra, 4, "--ckpt_path", "last")
    else:
        _fit(tmp_path, method, strategy, extra, 4)
    # evaluated at optimiser steps 2 and 4, each logged once (by rank 0), across the resume
    logged = _logged(tmp_path, METRIC[callback])
    assert sorted(logged) == sorted(set(logged)) and len(logged) == 2, logged
    assert (tmp_path / "hf_model").is_dir() and any((tmp_path / "hf_model").iterdir())


def test_a_callback_that_cannot_evaluate_the_method_is_refused_at_start(tmp_path):
    text = (REPO / "configs" / "rm" / "tiny.yaml").read_text().replace("rlft/assets/", f"{SAMPLES}/")
    (tmp_path / "config.yaml").write_text(text)
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(tmp_path / "config.yaml"),
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.init_args.output_dir",
        str(tmp_path / "hf"),
        *_callback("perplexity", tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "PerplexityCallback evaluates a causal lm but RewardModel trains a reward model; use " in result.stderr
