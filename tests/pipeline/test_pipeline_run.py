"""``rlft pipeline`` end to end on tiny models, the way a user runs it: every stage's output feeds the next, the
report is written, a re-run skips finished stages, a killed stage resumes from its checkpoint, and a failing stage
stops the pipeline naming itself and its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # each stage is a process (~10 s of imports each on a quiet machine)

# every stage of configs/pipelines/tiny.yaml, in its order; all but sft and rm train a policy
STAGES = ("sft", "rm", "dpo", "dpo_rm_labels", "grpo", "ppo", "online_dpo")
POLICIES = STAGES[2:]


def _pipeline(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlft", "pipeline", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def tiny_run(repo_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    result = _pipeline(repo_root, "-c", "configs/pipelines/tiny.yaml", "--run_dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


def test_every_stage_runs_wired_to_the_previous_ones_and_the_report_is_written(tiny_run):
    run_dir, _ = tiny_run
    for stage in ("data", *STAGES, "online_dpo/round_1", "online_dpo/round_2", "evaluation"):
        assert (run_dir / stage / "DONE").exists(), stage

    def fit_config(stage: str) -> dict:
        return yaml.safe_load((run_dir / stage / "config.yaml").read_text())

    for stage in ("dpo", "dpo_rm_labels", "grpo", "ppo"):
        assert fit_config(stage)["model"]["init_args"]["model"] == str(run_dir / "sft" / "hf_model"), stage
    for stage in ("grpo", "ppo"):
        rewards = fit_config(stage)["model"]["init_args"]["rewards"]
        assert [r["options"]["path"] for r in rewards] == [str(run_dir / "rm" / "hf_model")], stage
    assert fit_config("ppo")["model"]["class_path"] == "rlft.methods.PPO"
    # dpo_rm_labels trains on the split's train pairs re-ordered by the reward model
    relabelled = run_dir / "dpo_rm_labels" / "relabelled_pairs.jsonl"
    assert fit_config("dpo_rm_labels")["data"]["init_args"]["path"] == str(relabelled)
    assert fit_config("dpo")["data"]["init_args"]["path"] == str(run_dir / "data" / "train_pairs.jsonl")
    stats = json.loads((run_dir / "dpo_rm_labels" / "relabel.json").read_text())
    n_train = json.loads((run_dir / "data" / "split.json").read_text())["train"]
    assert stats["n"] == n_train and 0 <= stats["swapped"] <= n_train and 0 <= stats["ties"] <= n_train
    assert stats["agreement"] == pytest.approx((n_train - stats["swapped"] - stats["ties"] / 2) / n_train)
    assert stats["reward_model"] == str(run_dir / "rm" / "hf_model")
    rows = [json.loads(x) for x in relabelled.read_text().splitlines()]
    assert len(rows) == n_train and all(r["chosen_reward"] >= r["rejected_reward"] for r in rows)
    round_2 = yaml.safe_load((run_dir / "online_dpo" / "round_2" / "config.yaml").read_text())["model"]["init_args"]
    # round 2 continues round 1's policy, the reference stays the start (SFT)
    assert round_2["model"] == str(run_dir / "online_dpo" / "round_1" / "hf_model")
    assert round_2["ref_model"] == str(run_dir / "sft" / "hf_model") and round_2["reference"] == "precomputed"
    pairs = [json.loads(x) for x in (run_dir / "online_dpo" / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)

    results = json.loads((run_dir / "evaluation" / "results.json").read_text())
    rm = results["reward_model"]
    assert rm["accuracy_ci"][0] <= rm["accuracy"] <= rm["accuracy_ci"][1]
    assert set(results["policies"]) == {"base", "start", *POLICIES}
    for name in POLICIES:
        policy = results["policies"][name]
        assert {"mean_reward", "win_rate", "kl_to_start", "refusal_rate", "toxicity", "reward_gain"} <= set(policy)
        assert policy["win_rate"]["n"] == results["n_prompts"]
    assert "alt-profanity-check" in results["toxicity_classifier"] and "rubric" in results["refusal_classifier"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Reward model (held-out pairs)" in report and "| online_dpo |" in report
    for png in ("curves_rm.png", "curves_grpo.png", "curves_online_dpo_round_2.png", "win_rates.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000, png
    assert f"![rm learning curves](curves_rm.png)" in report  # noqa: F541 - literal markdown


def test_rerun_skips_done_stages_and_a_killed_stage_resumes_from_its_checkpoint(tiny_run, repo_root):
    run_dir, _ = tiny_run
    again = _pipeline(repo_root, "-c", "configs/pipelines/tiny.yaml", "--run_dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    for stage in STAGES:
        assert f"stage {stage} already DONE, skipped" in again.stdout
    assert "evaluation already DONE, skipped" in again.stdout and "relabelling" not in again.stdout

    # a DPO run killed after its last checkpoint but before the export: no DONE, no hf_model, a last.ckpt
    (run_dir / "dpo" / "DONE").unlink()
    export = run_dir / "dpo" / "hf_model"
    for f in sorted(export.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    export.rmdir()
    assert (run_dir / "dpo" / "checkpoints" / "last.ckpt").exists()
    resumed = _pipeline(repo_root, "-c", "configs/pipelines/tiny.yaml", "--run_dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "stage dpo resuming from last.ckpt" in resumed.stdout and "stage rm already DONE" in resumed.stdout
    assert (run_dir / "dpo" / "DONE").exists() and (export / "adapter_config.json").exists()
    assert "--ckpt_path last" in (run_dir / "dpo" / "stage.log").read_text()
    assert "rlft pipeline: evaluation (log:" in resumed.stdout  # a re-run stage makes the evaluation stale


def test_a_failing_stage_stops_the_pipeline_naming_the_stage_and_its_log(repo_root, tmp_path):
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"paths": ["rlft/assets/sample_pairs.jsonl"], "heldout_fraction": 0.25},
        "stages": {"dpo": {"config": "configs/dpo/tiny.yaml", "args": {"model.beta": -1.0}}},
        "evaluation": None,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = _pipeline(repo_root, "-c", str(path))
    assert result.returncode == 1
    assert "stage 'dpo' failed with exit code" in result.stderr
    assert str(tmp_path / "run" / "dpo" / "stage.log") in result.stderr and "beta must be > 0" in result.stderr
    assert not (tmp_path / "run" / "dpo" / "DONE").exists()


def test_a_stage_whose_settings_changed_runs_again_and_changed_data_is_refused(tiny_run, repo_root, tmp_path):
    run_dir, _ = tiny_run
    config = yaml.safe_load((repo_root / "configs/pipelines/tiny.yaml").read_text())
    config["stages"]["dpo"]["args"]["model.beta"] = 0.3  # a user changes one stage and runs the pipeline again
    changed = tmp_path / "tiny_beta.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    again = _pipeline(repo_root, "-c", str(changed), "--run_dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert "stage dpo re-runs from scratch (its settings changed)" in again.stdout
    for stage in STAGES:
        if stage != "dpo":
            assert f"stage {stage} already DONE, skipped" in again.stdout
    assert yaml.safe_load((run_dir / "dpo" / "config.yaml").read_text())["model"]["init_args"]["beta"] == 0.3
    assert "rlft pipeline: evaluation (log:" in again.stdout  # the report shows the new DPO policy

    config["data"]["heldout_fraction"] = 0.5
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    refused = _pipeline(repo_root, "-c", str(changed), "--run_dir", str(run_dir))
    assert refused.returncode != 0 and "the data settings changed" in refused.stderr
