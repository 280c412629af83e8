"""`rlft eval` end to end on tiny models (CLI flags and YAML configs) and the Markdown/PNG report."""

from __future__ import annotations

import json

import pytest
import transformers

from rlft.cli.eval import main
from rlft.eval.harness import TASKS_DIR
from rlft.eval.report import build_report, read_metrics_csv
from rlft.eval.results import make_result, write_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    sft = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(3)
    ]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft))
    pairs = [
        {"prompt": f"Say something nice #{i}", "chosen": "You are great!", "rejected": "Go away."} for i in range(4)
    ]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    return root


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    from rlft.models import load_tokenizer, resolve_model

    folder = tmp_path_factory.mktemp("rm")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-llama").path, num_labels=1)
    rm.save_pretrained(folder)
    load_tokenizer("tiny-llama").save_pretrained(folder)
    return str(folder)


def test_help_for_every_command(capsys):
    for command in (
        "perplexity",
        "accuracy",
        "rouge",
        "humaneval",
        "harness",
        "rewardbench",
        "compare",
        "judge",
        "agent",
        "report",
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_perplexity_accuracy_and_humaneval_from_flags_and_yaml(tmp_path, data_dir, tiny):
    from rlft.eval.perplexity import perplexity

    out = tmp_path / "results"
    main(["perplexity", "tiny-llama", str(data_dir / "sft.jsonl"), "--out", str(out)])
    written = json.loads((out / "perplexity.json").read_text())
    model, tok = tiny
    records = [json.loads(line) for line in (data_dir / "sft.jsonl").read_text().splitlines()]
    assert written["metrics"]["perplexity"] == pytest.approx(perplexity(model, tok, records).perplexity, rel=1e-5)
    assert "| perplexity |" in (out / "perplexity.md").read_text()

    main(["accuracy", "tiny-llama", str(TASKS_DIR / "rlft_mc_basics.jsonl"), "--limit", "4", "--out", str(out)])
    assert json.loads((out / "accuracy_choice.json").read_text())["metrics"]["n"] == 4

    config = tmp_path / "humaneval.yaml"
    config.write_text(f"model: tiny-llama\nlimit: 2\nmax_new_tokens: 8\nmode: completion\nout: {out}\n")
    main(["humaneval", "--config", str(config)])
    he = json.loads((out / "humaneval.json").read_text())
    assert he["metrics"]["problems"] == 2 and "pass@1" in he["metrics"]
    assert len(he["details"]["per_problem"]) == 2

    report_dir = tmp_path / "report"
    main(["report", "--results", json.dumps([str(out)]), "--out", str(report_dir)])
    text = (report_dir / "report.md").read_text()
    assert "| perplexity | tiny-llama | perplexity |" in text and "| humaneval | tiny-llama | pass@1 |" in text


def test_rewardbench_and_compare_with_a_reward_model_folder(tmp_path, data_dir, reward_folder):
    out = tmp_path / "results"
    pairs = str(data_dir / "pairs.jsonl")
    main(["rewardbench", reward_folder, pairs, "--policy", "tiny-llama", "--max_new_tokens", "6", "--out", str(out)])
    bench = json.loads((out / "rewardbench.json").read_text())["metrics"]
    assert bench["pairs"]["n"] == 4 and 0 <= bench["pairs"]["accuracy"] <= 1
    # toxicity is measured by default, by a classifier trained on human labels, and says which one
    assert 0 <= bench["policy"]["toxicity"] <= 1 and "alt-profanity-check" in bench["policy"]["toxicity_classifier"]
    main(
        [
            "rewardbench",
            reward_folder,
            pairs,
            "--policy",
            "tiny-llama",
            "--max_new_tokens",
            "4",
            "--toxicity_model",
            "none",
            "--out",
            str(tmp_path / "none"),
        ]
    )
    unmeasured = json.loads((tmp_path / "none" / "rewardbench.json").read_text())["metrics"]["policy"]
    assert unmeasured["toxicity"] is None and "not measured" in unmeasured["toxicity_note"]
    policies = json.dumps({"base": "tiny-llama", "other": "tiny-qwen2"})
    main(
        [
            "compare",
            policies,
            pairs,
            "base",
            "--reward_model",
            reward_folder,
            "--max_new_tokens",
            "6",
            "--n_bootstrap",
            "200",
            "--out",
            str(out),
        ]
    )
    result = json.loads((out / "compare.json").read_text())
    assert result["metrics"]["policies"]["other"]["win_rate"]["n"] == 4
    assert len(result["details"]["examples"]) == 4


def test_bad_input_gives_actionable_errors(tmp_path, data_dir):
    with pytest.raises(ValueError, match="baseline"):
        main(["compare", '{"a": "tiny-llama"}', str(data_dir / "pairs.jsonl"), "b"])
    with pytest.raises(ValueError, match="judge_model"):
        main(["judge", "tiny-llama", str(data_dir / "pairs.jsonl")])
    with pytest.raises(SystemExit):
        main(["perplexity", "tiny-llama", "x.jsonl", "--mode", "sideways"])
    with pytest.raises(ValueError, match="nothing to report"):
        build_report(out_dir=tmp_path)


def test_report_plots_curves_win_rates_and_examples(tmp_path):
    log = tmp_path / "run" / "version_0"
    log.mkdir(parents=True)
    rows = ["epoch,step,train/loss,train/reward,train/kl,val/loss"]
    rows += [f"0,{s},{2.0 - 0.1 * s},{0.1 * s},{0.01 * s}," for s in range(10)] + ["0,9,,,,1.5"]
    (log / "metrics.csv").write_text("\n".join(rows) + "\n")
    series = read_metrics_csv(log / "metrics.csv")
    assert series["val/loss"] == [(9.0, 1.5)] and len(series["train/loss"]) == 10
    summary = {
        "baseline": "base",
        "policies": {
            "base": {"mean_reward": 0.1},
            "dpo": {
                "mean_reward": 0.4,
                "win_rate": {"rate": 0.7, "ci_low": 0.55, "ci_high": 0.85, "wins": 7, "ties": 0, "losses": 3, "n": 10},
            },
        },
    }
    examples = [{"prompt": "Hi | there", "base": "hello\nworld", "dpo": "Hey!"}]
    write_result(
        make_result("compare", {"base": "a", "dpo": "b"}, summary, details={"examples": examples}), tmp_path / "r"
    )
    report = build_report([tmp_path / "r"], [tmp_path / "run"], out_dir=tmp_path / "out")
    text = report.read_text()
    for png in ("curves_0.png", "win_rates.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG_MAGIC and f"({png})" in text
    assert "| dpo vs base | 0.700 | [0.550, 0.850] | 7/0/3 |" in text
    assert "| Hi \\| there | hello<br>world | Hey! |" in text
    assert "| compare | base, dpo | policies/dpo/mean_reward | 0.4 |" in text
