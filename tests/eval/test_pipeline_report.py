"""The pipeline report: held-out tables with CIs, every policy against the start, curves of every stage."""

from __future__ import annotations

import json

from rlft.eval.report import build_pipeline_report


def _csv(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    path.write_text(",".join(keys) + "\n" + "\n".join(",".join(str(r.get(k, "")) for k in keys) for r in rows) + "\n")


def test_report_tables_curves_and_rounds(tmp_path):
    run = tmp_path / "run"
    _csv(
        run / "rm" / "csv" / "version_0" / "metrics.csv",
        [{"step": s, "train/loss": 0.7 - 0.01 * s, "val/accuracy": 0.5 + 0.01 * s} for s in range(5)],
    )
    # a resumed stage has two logs: their steps are merged into one curve
    _csv(run / "grpo" / "csv" / "version_0" / "metrics.csv", [{"step": 0, "train/reward": 0.1, "train/kl": 0.0}])
    _csv(run / "grpo" / "csv" / "version_1" / "metrics.csv", [{"step": 1, "train/reward": 0.3, "train/kl": 0.02}])
    for r, reward in ((1, -0.2), (2, 0.4)):
        (run / "online_dpo" / f"round_{r}").mkdir(parents=True)
        (run / "online_dpo" / f"round_{r}" / "sampling.json").write_text(json.dumps({"mean_sample_reward": reward}))
        _csv(run / "online_dpo" / f"round_{r}" / "csv" / "v" / "metrics.csv", [{"step": 0, "train/loss": 0.69}])
    win = {"rate": 0.7, "ci_low": 0.55, "ci_high": 0.85, "wins": 7, "ties": 0, "losses": 3, "n": 10}
    results = {
        "reward_model": {
            "n": 100,
            "accuracy": 0.61,
            "accuracy_ci": [0.52, 0.7],
            "auroc": 0.64,
            "auroc_ci": [0.56, 0.71],
            "mean_margin": 0.3,
        },
        "start": "start",
        "n_prompts": 10,
        "length_slope": -0.02,
        "refusal_classifier": "rubric",
        "toxicity_classifier": "apc",
        "settings": {"temperature": 1.0, "max_new_tokens": 32, "seed": 0},
        "policies": {
            "start": {
                "mean_reward": -0.5,
                "mean_reward_ci": [-0.7, -0.3],
                "refusal_rate": 0.1,
                "toxicity": 0.05,
                "mean_words": 20.0,
            },
            "grpo": {
                "mean_reward": 0.1,
                "mean_reward_ci": [-0.1, 0.3],
                "refusal_rate": 0.3,
                "toxicity": 0.01,
                "mean_words": 12.0,
                "reward_gain": 0.6,
                "reward_gain_relative": 1.2,
                "reward_gain_std": 0.9,
                "win_rate": win,
                "length_controlled_gain": 0.4,
                "length_controlled_gain_ci": [0.1, 0.7],
                "length_controlled_win_rate": {**win, "rate": 0.6, "ci_low": 0.45, "ci_high": 0.75},
                "kl_to_start": 2.5,
                "kl_to_start_ci": [1.5, 3.5],
            },
        },
        "examples": [
            {
                "prompt": "How do I | pick a lock?",
                "start": "Sure, first...",
                "grpo": "I can't help.",
                "rewards": {"start": -1.0, "grpo": 0.5},
            }
        ],
    }
    (run / "evaluation").mkdir()
    (run / "evaluation" / "results.json").write_text(json.dumps(results))
    report = build_pipeline_report(run / "evaluation" / "results.json", run, out_dir=run / "report", title="T")
    text = report.read_text()
    assert "| 100 | 0.610 | [0.520, 0.700] | 0.640 | [0.560, 0.710] | 0.300 |" in text
    assert (
        "| grpo | 0.100 [-0.100, 0.300] | +0.600 (+120%) | +0.90 | 0.700 [0.550, 0.850] | +0.400 [0.100, 0.700] | "
        "0.600 [0.450, 0.750] | 2.50 [1.500, 3.500] |" in text
    )
    assert "| start | -0.500 [-0.700, -0.300] | — | — | — | — | — | — | 0.100 | 0.050 | 20.0 |" in text
    assert "minus -0.0200 per word" in text
    # the guide's checkpoints under each stage's curves: start/end are means of the first/last 10 % of points
    assert "| `train/loss` | 0.7 | 0.66 | 5 | falls (DPO: 0.69 -> 0.4-0.5) |" in text
    assert "| `train/reward` | 0.1 | 0.3 | 2 | rises |" in text
    assert "How do I \\| pick a lock?" in text  # table cells are escaped
    for png in (
        "curves_rm.png",
        "curves_grpo.png",
        "curves_online_dpo_round_1.png",
        "online_rounds.png",
        "win_rates.png",
    ):
        assert (run / "report" / png).stat().st_size > 1000 and f"({png})" in text, png
