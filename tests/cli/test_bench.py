"""The benchmark's plumbing on a tiny model: both frameworks run the same work and start from the same loss.

Speed is never asserted here (benchmarks print ratios; they do not belong in unit tests); what is checked is what
makes the ratios meaningful: identical step-0 losses and sane token counts.
"""

from __future__ import annotations

import pytest

from rlft.cli.bench import BenchConfig, run

pytest.importorskip("trl")


DATA = {
    "sft": "rlft/assets/sample_sft.jsonl",
    "dpo": "rlft/assets/sample_pairs.jsonl",
    "rm": "rlft/assets/sample_pairs.jsonl",
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo", "rm"])
def test_bench_runs_rlft_and_trl_on_identical_work(capsys, mode):
    cfg = BenchConfig(mode=mode, model="tiny-llama", data=DATA[mode], steps=3, warmup=1, repeats=1,
                      rlft_variants=["default"], trl_variants=["nogc"], max_length=128)  # fmt: skip
    results = run(cfg)
    by_framework = {r["framework"]: r for r in results}
    assert by_framework["rlft"]["step0_loss"] == pytest.approx(by_framework["trl"]["step0_loss"], rel=1e-4)
    for result in results:
        assert result["timed_steps"] == 2 and result["tokens_per_sec"] > 0 and result["peak_rss_mb"] > 100
    assert "speed x" in capsys.readouterr().out


@pytest.mark.slow
def test_grpo_bench_gives_both_frameworks_the_same_rollouts_to_make(capsys):
    cfg = BenchConfig(mode="grpo", model="tiny-llama", steps=3, warmup=1, repeats=1, max_new_tokens=6,
                      trl_variants=["nogc"])  # fmt: skip
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


def test_a_misspelt_variant_is_refused_not_run_as_the_default():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bf16dec'\].*bf16decode"):
        BenchConfig(mode="grpo", rlft_variants=["gc+bf16dec"])
    with pytest.raises(ValueError, match="unknown option"):
        BenchConfig(mode="dpo", trl_variants=["hfgen"])  # an online-only option offline
    assert BenchConfig(mode="dpo").rlft_variants == ["packing"] and BenchConfig(mode="dpo").beta == 0.1
