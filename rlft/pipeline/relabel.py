"""Relabel a pair stage's training pairs with the pipeline's reward model (``relabel: rm`` on a DPO, ORPO or SimPO
stage): each pair's chosen and rejected reply are scored by the RM and the higher-scored one becomes ``chosen``,
so the stage learns the RM's preferences on the human pairs' replies instead of the human labels (AI feedback in
place of human labels, as RLAIF does with an LLM labeller: Lee et al. 2023, https://arxiv.org/abs/2309.00267)::

    <run>/<stage>/relabelled_pairs.jsonl   the split's train pairs, chosen = the reply the RM scores higher
                                           (a tie keeps the human order), with chosen_reward / rejected_reward
    <run>/<stage>/relabel.json             n, swapped, ties, agreement with the human labels, mean human margin

Scoring runs as its own process (``python -m rlft.pipeline.relabel``) like every stage, so a crash or an
out-of-memory kill stays in it and the RM's memory is gone before the stage trains; a stage killed during its fit
keeps its relabelled file and resumes without scoring again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

DEFAULT_MAX_LENGTH = 1024


def relabel_pairs(pairs: list[dict], chosen_scores, rejected_scores) -> tuple[list[dict], dict]:
    """The pairs re-ordered by reward (the pure decision, no model), and how far the RM agrees with the labels.

    ``chosen_scores[i]`` / ``rejected_scores[i]`` score pair ``i``'s human-chosen / human-rejected reply. A pair
    whose rejected reply scores strictly higher is swapped; a tie keeps the human order (the RM has no opinion).
    ``agreement`` counts a tie half, as :func:`rlft.eval.reward_bench.preference_accuracy` does, so it equals the
    RM's accuracy on these pairs.
    """
    if not (len(pairs) == len(chosen_scores) == len(rejected_scores)):
        raise ValueError(
            f"relabel_pairs: {len(pairs)} pairs but {len(chosen_scores)} chosen and "
            f"{len(rejected_scores)} rejected scores"
        )
    out, swapped, ties, margin = [], 0, 0, 0.0
    for pair, good, bad in zip(pairs, chosen_scores, rejected_scores):
        good, bad = float(good), float(bad)
        margin += good - bad
        ties += good == bad
        if bad > good:
            swapped += 1
            pair = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
            good, bad = bad, good
        out.append({**pair, "chosen_reward": good, "rejected_reward": bad})
    n = len(pairs)
    stats = {
        "n": n,
        "swapped": swapped,
        "ties": ties,
        "agreement": (n - swapped - ties / 2) / n if n else float("nan"),
        "mean_human_margin": margin / n if n else float("nan"),
    }
    return out, stats


def score_pairs(reward_model: str, pairs_path: str, out: str, *, max_length: int, batch_size: int = 8) -> dict:
    """Score every pair of ``pairs_path`` with ``reward_model``; write ``out`` (pairs JSONL, the format
    :mod:`rlft.pipeline.online` writes) and ``relabel.json`` beside it; returns the statistics."""
    from rlft.eval.data import load_records
    from rlft.eval.reward_bench import load_reward_scorer

    pairs = load_records(pairs_path, kind="pairs")
    scorer = load_reward_scorer(reward_model, batch_size=batch_size, max_length=max_length)
    # one call for both replies: the scorer batches across pairs
    scores = scorer.score_exchanges(
        [p["prompt"] for p in pairs for _ in (0, 1)], [p[side] for p in pairs for side in ("chosen", "rejected")]
    )
    relabelled, stats = relabel_pairs(pairs, scores[0::2], scores[1::2])
    stats.update(reward_model=reward_model, max_length=max_length)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in relabelled)
    Path(out).with_name("relabel.json").write_text(json.dumps(stats, indent=2))
    return stats


def reward_max_length(runner, reward_stage: str) -> int:
    """Tokens the RM reads per exchange: its own training ``data.max_length`` (its args, else its config's), so
    it scores the window it learned on; 1024 when neither sets one."""
    stage = runner.config.stages[reward_stage]
    if "data.max_length" in stage.args:
        return int(stage.args["data.max_length"])
    config = yaml.safe_load(Path(stage.config).read_text()) or {}
    data = config.get("data") or {}
    return int((data.get("init_args") or data).get("max_length") or DEFAULT_MAX_LENGTH)


def relabel_stage(runner, name: str, stage, train_path: str) -> str:
    """Write (or reuse) ``<stage>/relabelled_pairs.jsonl`` from ``train_path``; returns its path for the fit.

    The runner clears a stage's folder whenever it re-runs it from scratch (settings changed, its RM re-ran,
    ``--force``), so a relabelled file found here was scored for the current settings: a resumed fit reuses it.
    """
    folder = runner.stage_dir(name)
    out, stats_path = folder / "relabelled_pairs.jsonl", folder / "relabel.json"
    if not (out.exists() and stats_path.exists()):
        print(
            f"rlft pipeline: stage {name}: relabelling its pairs with {stage.relabel} (log: {folder / 'stage.log'})",
            flush=True,
        )
        argv = [
            runner.python,
            "-m",
            "rlft.pipeline.relabel",
            "--reward_model",
            str(runner.model_of(stage.relabel)),
            "--pairs",
            train_path,
            "--out",
            str(out),
            "--max_length",
            str(reward_max_length(runner, stage.relabel)),
        ]
        runner._run_process(f"{name} relabel", argv, folder / "stage.log")
    stats = json.loads(stats_path.read_text())
    print(
        f"rlft pipeline: stage {name}: {stats['swapped']} of {stats['n']} pairs swapped by {stage.relabel} "
        f"({stats['ties']} ties; agreement with the human labels {stats['agreement']:.3f})",
        flush=True,
    )
    return str(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.pipeline.relabel", description=__doc__)
    parser.add_argument("--reward_model", required=True, help="reward model folder (an rm stage's hf_model)")
    parser.add_argument("--pairs", required=True, help="pair file to relabel (any rlft pair format)")
    parser.add_argument("--out", required=True, help="relabelled pairs JSONL; relabel.json is written beside it")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens the RM reads per exchange")
    parser.add_argument("--batch_size", type=int, default=8, help="exchanges per RM forward pass")
    args = parser.parse_args(argv)
    stats = score_pairs(args.reward_model, args.pairs, args.out, max_length=args.max_length, batch_size=args.batch_size)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
