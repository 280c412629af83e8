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
