"""The benchmark's plumbing on a tiny model: both frameworks run the same work and start from the same loss.

Speed is never asserted here (benchmarks print ratios; they do not belong in unit tests); what is checked is what
makes the ratios meaningful: identical step-0 losses and sane token counts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

# the harness runs from the checkout (python scripts/bench/run.py), its modules found beside it
BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
bench = sys.modules["bench_run"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(bench)
BenchConfig, run = bench.BenchConfig, bench.run


DATA = {
    "sft": "rlft/assets/sample_sft.jsonl",
    "dpo": "rlft/assets/sample_pairs.jsonl",
    "rm": "rlft/assets/sample_pairs.jsonl",
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo", "rm"])
def test_bench_runs_rlft_and_trl_on_identical_work(capsys, mode):
    cfg = BenchConfig(
        mode=mode,
        model="tiny-llama",
        data=DATA[mode],
        steps=3,
        warmup=1,
        repeats=1,
        rlft_variants=["default"],
        trl_variants=["nogc"],
        max_length=128,
    )
    results = run(cfg)
    by_framework = {r["framework"]: r for r in results}
    assert by_framework["rlft"]["step0_loss"] == pytest.approx(by_framework["trl"]["step0_loss"], rel=1e-4)
    for result in results:
        assert result["timed_steps"] == 2 and result["tokens_per_sec"] > 0 and result["peak_rss_mb"] > 100
    assert "speed x" in capsys.readouterr().out


@pytest.mark.slow
def test_grpo_bench_gives_both_frameworks_the_same_rollouts_to_make(capsys):
    cfg = BenchConfig(
        mode="grpo", model="tiny-llama", steps=3, warmup=1, repeats=1, max_new_tokens=6, trl_variants=["nogc"]
    )
    assert cfg.rlft_variants == ["default"] and cfg.beta == 0.04 and cfg.lr == 2e-4  # the online defaults
    results = run(cfg)
    assert {r["framework"] for r in results} == {"rlft", "trl"}
    for result in results:
        # the same work: 4 prompts x group 4 per step, responses within the token limit, one reward per step
        assert result["completions"] == [16, 16, 16] and len(result["rewards"]) == 3
        assert all(0 < tokens <= 16 * 6 for tokens in result["response_tokens"])
        assert 0 < result["generation_time_s"] <= result["rollout_time_s"] < result["step_time_s"]
        assert result["update_time_s"] > 0 and result["peak_rss_mb"] > 100
    assert "reward first -> last" in capsys.readouterr().out


@pytest.mark.slow
def test_rlft_alone_is_summarised_against_its_first_run_and_the_seed_picks_the_samples(capsys):
    def rollouts(seed: int) -> list[tuple[list, list]]:
        cfg = BenchConfig(
            mode="grpo",
            model="tiny-llama",
            steps=2,
            warmup=1,
            repeats=2,
            max_new_tokens=6,
            trl_variants=[],
            rlft_variants=["sgc"],
            seed=seed,
        )
        return [(r["response_tokens"], r["rewards"]) for r in run(cfg)]

    first, again = rollouts(1)
    assert first == again  # a seed repeats its samples
    assert "ratios vs rlft/sgc" in capsys.readouterr().out  # no TRL run: ratios against the first run
    other, _ = rollouts(2)
    assert other != first


def test_the_script_runs_from_the_checkout_and_rlft_no_longer_ships_it(repo_root):
    import subprocess

    result = subprocess.run(
        [sys.executable, "scripts/bench/run.py", "--help"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--rlft_variants" in result.stdout and "python scripts/bench/run.py --mode" in result.stdout
    assert importlib.util.find_spec("rlft.cli.bench") is None


def test_a_misspelt_variant_is_refused_not_run_as_the_default():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bf16dec'\].*bf16decode"):
        BenchConfig(mode="grpo", rlft_variants=["gc+bf16dec"])
    with pytest.raises(ValueError, match="unknown option"):
        BenchConfig(mode="dpo", trl_variants=["hfgen"])  # an online-only option offline
    assert BenchConfig(mode="dpo").rlft_variants == ["packing"] and BenchConfig(mode="dpo").beta == 0.1


TRL_PPO = BENCH.parents[1] / ".bench" / "trl-1.12"
needs_trl_ppo = pytest.mark.skipif(
    not (TRL_PPO / "trl").is_dir(), reason="scripts/setup_env.sh dev installs TRL 1.12 there"
)


@needs_trl_ppo
def test_rule_reward_is_what_trl_ppo_reads_for_each_response():
    """TRL's own get_reward on the wrapped rule reward gives, per row, what rlft's reward code gives the same text."""
    import subprocess
    import sys

    script = """
import torch, transformers
from trl.experimental.utils import get_reward
from bench_online import REWARDS
from bench_ppo import RuleRewardModel
from rlft.models import resolve_model
from rlft.rl.rewards import Rewards
tok = transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path, padding_side="left")
rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 10 + 7?", "answer": "17"}]
prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for r in rows]
pad = 0
replies = ["The answer is 5", "It is 16, I think, though I am not completely sure about it"]
responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in replies]
width = max(map(len, prompts))
length = max(map(len, responses)) + 3
rows_ids = [[pad] * (width - len(p)) + p + r + [pad] * (length - len(r)) for p, r in zip(prompts, responses)]
model = RuleRewardModel(tok, prompts, rows, Rewards(REWARDS))
_, scores, _ = get_reward(model, torch.tensor(rows_ids), pad, width)
expected, _ = Rewards(REWARDS)([[{"role": "user", "content": r["prompt"]}] for r in rows], replies,
                               {"answer": [r["answer"] for r in rows]})
print(scores.tolist(), [float(v) for v in expected])
assert scores.tolist() == [float(v) for v in expected] == [1.5, 0.0], scores
"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TRL_PPO), str(BENCH)]),
        "HF_HUB_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@needs_trl_ppo
def test_ppo_bench_runs_trl_ppo_and_rlft_on_the_same_rollouts(capsys):
    cfg = BenchConfig(
        mode="ppo",
        model="tiny-llama",
        steps=3,
        warmup=1,
        repeats=1,
        max_new_tokens=6,
        ppo_epochs=2,
        trl_variants=["nogc", "loracritic+nogc"],
        rlft_variants=["default", "critic"],
    )
    assert cfg.beta == 0.05 and cfg.trl_path == str(TRL_PPO)
    results = run(cfg)
    assert {(r["framework"], r["variant"]) for r in results} == {
        ("trl", "nogc"),
        ("trl", "loracritic+nogc"),
        ("rlft", "default"),
        ("rlft", "critic"),
    }
    for result in results:
        # 4 prompts per rollout, one reward per rollout, responses within the token limit
        assert result["completions"] == [4, 4, 4] and len(result["rewards"]) == 3, result
        assert all(0 < tokens <= 4 * 6 for tokens in result["response_tokens"])
        assert 0 < result["generation_time_s"] <= result["rollout_time_s"] < result["step_time_s"]
        assert result["update_time_s"] > 0
    assert "2 PPO epochs" in capsys.readouterr().out


def test_ppo_without_trl_ppo_names_the_install(tmp_path):
    cfg = BenchConfig(mode="ppo", model="tiny-llama", trl_path=str(tmp_path), steps=1, warmup=0)
    with pytest.raises(RuntimeError, match=r"trl.experimental.ppo.*trl==1.12.0"):
        bench._launch("trl", "default", cfg)
