"""Turn collected votes into training pairs and into model-vs-model evaluation results.

Export rules for pairs (``rlft label export``), applied per example to its votes (``a``, ``b`` or ``tie`` with
respect to the stored responses; the randomised display order was already undone when the vote was stored):

1. Examples with fewer than ``min_votes`` votes are skipped and counted as ``too_few_votes`` (unfinished items).
2. The winner is the majority over the **non-tie** votes. If every vote is a tie the example is skipped as
   ``all_ties``; if A and B got the same number of votes it is skipped as ``split``.
3. Agreement = votes for the winner / all votes (ties included). Below ``min_agreement`` the example is skipped as
   ``low_agreement`` (default 0.5: "a, a, b" passes with 0.67, "a, tie, tie" fails with 0.33).
4. Otherwise the winner becomes ``chosen`` and the other response ``rejected``, written as the canonical pair
   ``{"prompt": [messages], "chosen": str, "rejected": str}`` that ``rlft fit -c configs/dpo/...`` and the reward
   model read. ``with_metadata`` adds ``example_id``, ``votes`` and ``agreement`` fields.

The summary (written / skipped per reason) is returned and printed by the CLI, so nothing disappears silently.

Win-rates (``rlft label export --winrate``): for every unordered pair of models, each example's outcome follows
rule 2 (majority over non-tie votes; all-tie and split items count as ties, no agreement threshold) and is scored
1 for a win of the first model (alphabetical), 0.5 for a tie, 0 for a loss. The win-rate is the mean score with a
normal-approximation 95% CI; ``decisive_win_rate`` leaves ties out and carries a Wilson 95% CI.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from rlft.label.agreement import mean_interval
from rlft.label.queries import Vote, load_examples, load_votes, overview
from rlft.metrics import wilson_interval

SKIP_REASONS = ("too_few_votes", "all_ties", "split", "low_agreement")


@dataclass
class ExportSummary:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    unlabeled: int = 0

    def as_dict(self) -> dict:
        return {"written": self.written, "unlabeled": self.unlabeled, **{r: self.skipped[r] for r in SKIP_REASONS}}


def decide(choices: Sequence[str], *, min_votes: int = 1, min_agreement: float = 0.5) -> tuple[str | None, str]:
    """Apply the export rules to one example's votes: ``(winner or None, reason)``."""
    if len(choices) < min_votes:
        return None, "too_few_votes"
    counts = Counter(choices)
    if counts["a"] == 0 and counts["b"] == 0:
        return None, "all_ties"
    if counts["a"] == counts["b"]:
        return None, "split"
    winner = "a" if counts["a"] > counts["b"] else "b"
    if counts[winner] / len(choices) < min_agreement:
        return None, "low_agreement"
    return winner, "ok"


def build_pairs(
    votes: Sequence[Vote],
    examples: dict[int, dict],
    *,
    min_votes: int = 1,
    min_agreement: float = 0.5,
    with_metadata: bool = False,
) -> tuple[list[dict], ExportSummary]:
    """Canonical preference pairs from votes (rules in the module docstring)."""
    by_item: dict[int, list[str]] = defaultdict(list)
    for vote in votes:
        by_item[vote.example_id].append(vote.choice)
    summary = ExportSummary()
    pairs = []
    for example_id in sorted(by_item):
        choices = by_item[example_id]
        winner, reason = decide(choices, min_votes=min_votes, min_agreement=min_agreement)
        if winner is None:
            summary.skipped[reason] += 1
            continue
        ex = examples[example_id]
        chosen, rejected = (
            (ex["response_a"], ex["response_b"]) if winner == "a" else (ex["response_b"], ex["response_a"])
        )
        pair = {"prompt": ex["prompt"], "chosen": chosen, "rejected": rejected}
        if with_metadata:
            pair |= {
                "example_id": example_id,
                "votes": dict(Counter(choices)),
                "agreement": Counter(choices)[winner] / len(choices),
                "chosen_model": ex["model_a"] if winner == "a" else ex["model_b"],
            }
        pairs.append(pair)
    summary.written = len(pairs)
    return pairs, summary


def export_pairs(
    engine: Engine,
    out: str | Path,
    *,
    min_votes: int = 1,
    min_agreement: float = 0.5,
    with_metadata: bool = False,
) -> ExportSummary:
    """Write the canonical pairs JSONL to ``out`` and return what was written and skipped."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    votes = load_votes(engine)
    examples = load_examples(engine, {v.example_id for v in votes})
    pairs, summary = build_pairs(
        votes, examples, min_votes=min_votes, min_agreement=min_agreement, with_metadata=with_metadata
    )
    summary.unlabeled = overview(engine)["examples"] - len({v.example_id for v in votes})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return summary


def win_rates(votes: Sequence[Vote]) -> list[dict]:
    """Model-vs-model results with confidence intervals (rules in the module docstring)."""
    by_item: dict[int, list[Vote]] = defaultdict(list)
    for vote in votes:
        if vote.model_a and vote.model_b and vote.model_a != vote.model_b:
            by_item[vote.example_id].append(vote)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for item_votes in by_item.values():
        model_a, model_b = item_votes[0].model_a, item_votes[0].model_b
        outcome = decide([v.choice for v in item_votes], min_agreement=0.0)[0] or "tie"
        score_a = {"a": 1.0, "b": 0.0, "tie": 0.5}[outcome]
        first, second = sorted((model_a, model_b))
        scores[first, second].append(score_a if first == model_a else 1.0 - score_a)
    results = []
    for (first, second), item_scores in sorted(scores.items()):
        mean, low, high = mean_interval(item_scores)
        wins = sum(s == 1.0 for s in item_scores)
        losses = sum(s == 0.0 for s in item_scores)
        decisive_ci = wilson_interval(wins, wins + losses)
        results.append(
            {
                "model_x": first,
                "model_y": second,
                "items": len(item_scores),
                "wins_x": wins,
                "wins_y": losses,
                "ties": len(item_scores) - wins - losses,
                "win_rate_x": mean,
                "win_rate_x_ci95": [low, high],
                "decisive_win_rate_x": wins / (wins + losses) if wins + losses else None,
                "decisive_win_rate_x_ci95": list(decisive_ci) if decisive_ci else None,
            }
        )
    return results


def format_win_rates(results: Sequence[dict]) -> str:
    """Win-rates as a Markdown table."""
    if not results:
        return "No votes on examples with two different model names (import with model_a/model_b to get win-rates)."
    lines = [
        "| model X | model Y | items | X wins | Y wins | ties | win-rate X (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["win_rate_x_ci95"]
        lines.append(
            f"| {r['model_x']} | {r['model_y']} | {r['items']} | {r['wins_x']} | {r['wins_y']} | {r['ties']} "
            f"| {r['win_rate_x']:.3f} ({low:.3f}-{high:.3f}) |"
        )
    return "\n".join(lines)
