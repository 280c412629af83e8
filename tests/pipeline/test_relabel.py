"""``relabel: rm`` on a pair stage: the relabel decision (pure), the scoring process on a stub reward model, and
the runner's wiring (the stage trains on the relabelled file; a re-run RM re-runs it). No model is trained here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlft.eval.data import load_records
from rlft.pipeline import PipelineRunner, load_pipeline
from rlft.pipeline.relabel import main as relabel_main
from rlft.pipeline.relabel import relabel_pairs

PAIRS = [
    {"prompt": [{"role": "user", "content": "a"}], "chosen": "A1", "rejected": "A2"},  # the RM agrees
    {"prompt": [{"role": "user", "content": "b"}], "chosen": "B1", "rejected": "B2", "margin": 1.0},  # disagrees
    {"prompt": [{"role": "user", "content": "c"}], "chosen": "C1", "rejected": "C2"},  # a tie
]


def test_the_higher_scored_reply_becomes_chosen_and_a_tie_keeps_the_human_order():
    out, stats = relabel_pairs(PAIRS, [2.0, -1.0, 0.5], [1.0, 3.0, 0.5])
    assert [(p["chosen"], p["rejected"]) for p in out] == [("A1", "A2"), ("B2", "B1"), ("C1", "C2")]
    assert [(p["chosen_reward"], p["rejected_reward"]) for p in out] == [(2.0, 1.0), (3.0, -1.0), (0.5, 0.5)]
    assert out[1]["margin"] == 1.0 and out[1]["prompt"] == PAIRS[1]["prompt"]  # the pair's other fields stay
    assert PAIRS[1]["chosen"] == "B1"  # the input is not mutated
    # agreement counts a tie half (as preference_accuracy): (1 + 0.5) / 3; mean human margin (1 - 4 + 0) / 3
    assert stats == {"n": 3, "swapped": 1, "ties": 1, "agreement": 0.5, "mean_human_margin": -1.0}


def test_scores_that_do_not_match_the_pairs_are_refused():
    with pytest.raises(ValueError, match="3 pairs but 2 chosen and 3 rejected scores"):
        relabel_pairs(PAIRS, [1.0, 2.0], [1.0, 2.0, 3.0])


class _LengthScorer:
    """A stand-in reward model: longer replies score higher."""

    def score_exchanges(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [float(len(r)) for r in responses]


def test_the_relabel_process_writes_pairs_the_stage_can_read_and_its_statistics(tmp_path, repo_root, monkeypatch):
    import rlft.eval.reward_bench as reward_bench

    seen = {}

    def load(path, *, batch_size, max_length):
        seen.update(path=path, max_length=max_length)
        return _LengthScorer()

    monkeypatch.setattr(reward_bench, "load_reward_scorer", load)
    source = repo_root / "rlft/assets/sample_pairs.jsonl"
    out = tmp_path / "stage" / "relabelled_pairs.jsonl"
    relabel_main(["--reward_model", "rm/hf_model", "--pairs", str(source), "--out", str(out), "--max_length", "64"])
    assert seen == {"path": "rm/hf_model", "max_length": 64}
    human = load_records(source, kind="pairs")
    relabelled = load_records(out, kind="pairs")  # the canonical pair format every pair method reads
    assert len(relabelled) == len(human)
    for before, after in zip(human, relabelled):
        assert after["prompt"] == before["prompt"]
        assert {after["chosen"], after["rejected"]} == {before["chosen"], before["rejected"]}
        assert len(after["chosen"]) >= len(after["rejected"])
    stats = json.loads((tmp_path / "stage" / "relabel.json").read_text())
    swapped = sum(len(p["rejected"]) > len(p["chosen"]) for p in human)
    assert stats["n"] == len(human) and stats["swapped"] == swapped and stats["max_length"] == 64


def _pipeline(tmp_path: Path, repo_root: Path) -> Path:
    data = tmp_path / "pairs.jsonl"
    shutil.copy(repo_root / "rlft/assets/sample_pairs.jsonl", data)
    stages = {
        "sft": {"config": "configs/sft/tiny.yaml"},
        "rm": {"config": "configs/rm/tiny.yaml", "args": {"data.max_length": 96}},
        "dpo": {"config": "configs/dpo/tiny.yaml", "init": "sft"},
        "dpo_rm_labels": {"method": "dpo", "config": "configs/dpo/tiny.yaml", "init": "sft", "relabel": "rm"},
    }
    config = {"run_dir": str(tmp_path / "run"), "data": {"paths": [str(data)]}, "stages": stages, "evaluation": None}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def stub_processes(monkeypatch):
    """``run_fit`` and the relabel process succeed without training or scoring, recording what ran with what."""
    ran: list[tuple[str, list]] = []

    def run_fit(self, name, config, folder, expected, *, settings=None):
        ran.append((name, config["data"]["init_args"]["path"]))
        expected.mkdir(parents=True)
        self.mark_done(folder, {"output": str(expected), "settings": settings})

    def run_process(self, name, argv, log_path):
        ran.append((name, argv))
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(Path(argv[argv.index("--pairs") + 1]).read_text())
        out.with_name("relabel.json").write_text(json.dumps({"n": 3, "swapped": 1, "ties": 0, "agreement": 2 / 3}))

    monkeypatch.setattr(PipelineRunner, "run_fit", run_fit)
    monkeypatch.setattr(PipelineRunner, "_run_process", run_process)
    return ran


def test_a_relabel_stage_trains_on_its_relabelled_file_and_reruns_with_its_reward_model(
    tmp_path, repo_root, monkeypatch, stub_processes, capsys
):
    monkeypatch.chdir(repo_root)
    config = load_pipeline(_pipeline(tmp_path, repo_root))
    run = tmp_path / "run"
    PipelineRunner(config).run()
    names = [name for name, _ in stub_processes]
    assert names == ["sft", "rm", "dpo", "dpo_rm_labels relabel", "dpo_rm_labels"]
    argv = dict(stub_processes)["dpo_rm_labels relabel"]
    assert argv[argv.index("--reward_model") + 1] == str(run / "rm" / "hf_model")
    assert argv[argv.index("--max_length") + 1] == "96"  # the window the RM was trained on
    assert dict(stub_processes)["dpo"] == str(run / "data" / "train_pairs.jsonl")
    assert dict(stub_processes)["dpo_rm_labels"] == str(run / "dpo_rm_labels" / "relabelled_pairs.jsonl")
    assert "1 of 3 pairs swapped by rm" in capsys.readouterr().out

    stub_processes.clear()
    PipelineRunner(config, force=("rm",)).run()  # a re-trained RM relabels again; the human-label DPO stays
    assert [name for name, _ in stub_processes] == ["rm", "dpo_rm_labels relabel", "dpo_rm_labels"]

    # killed after relabelling, before its fit finished: the resumed stage reuses the relabelled pairs
    (run / "dpo_rm_labels" / "DONE").unlink()
    shutil.rmtree(run / "dpo_rm_labels" / "hf_model")
    stub_processes.clear()
    PipelineRunner(config).run()
    assert [name for name, _ in stub_processes] == ["dpo_rm_labels"]


def test_fingerprints_of_stages_without_method_or_relabel_are_unchanged(tmp_path, repo_root, monkeypatch):
    """A run folder finished before ``method``/``relabel`` existed must not re-run every stage on upgrade."""
    import dataclasses

    monkeypatch.chdir(repo_root)
    runner = PipelineRunner(load_pipeline(_pipeline(tmp_path, repo_root)))
    stage = runner.config.stages["dpo"]
    old = {k: v for k, v in dataclasses.asdict(stage).items() if k not in ("method", "relabel")}
    assert runner.fingerprint("dpo", stage) == runner.fingerprint("dpo", old)
    relabelled = runner.config.stages["dpo_rm_labels"]
    assert runner.fingerprint("x", relabelled) != runner.fingerprint("x", dataclasses.replace(relabelled, relabel=None))
