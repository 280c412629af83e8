"""Labeling-quality report: agreement, agreement with the majority, position bias and time per label.

Definitions (votes are ``a`` / ``b`` / ``tie`` with respect to the stored responses, so the randomised display
order does not affect agreement):

* **Fleiss' kappa / Krippendorff's alpha** over every item with at least two votes.
* **Cohen's kappa** for every pair of labelers that share at least ``min_shared`` items.
* **Agreement with the majority** (per labeler): for each of their votes, the plurality of the *other* labelers'
  votes on that item (leave-one-out, ties count as a category); items where the others have no unique plurality
  are not counted.
* **Position bias**: share of non-tie votes that picked the response shown on the *left*, with a Wilson 95% CI; an
  unbiased labeler is near 0.5 because the sides are randomised per labeler and item.
* **Time per label**: seconds from the lease (item shown) to the submission, or the client's own measurement.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations

from rlft.label.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha, plurality
from rlft.label.queries import Vote
from rlft.metrics import wilson_interval


def _position(votes: Sequence[Vote]) -> dict:
    decisive = [v for v in votes if v.shown_choice != "tie"]
    left = sum(v.shown_choice == "left" for v in decisive)
    ci = wilson_interval(left, len(decisive))
    return {
        "non_tie_votes": len(decisive),
        "left_rate": left / len(decisive) if decisive else None,
        "left_rate_ci95": list(ci) if ci else None,
    }


def _times(votes: Sequence[Vote]) -> dict:
    times = [v.time_spent_s for v in votes if v.time_spent_s is not None]
    return {
        "median_s": statistics.median(times) if times else None,
        "mean_s": statistics.fmean(times) if times else None,
    }


def quality_report(votes: Sequence[Vote], *, min_shared: int = 2) -> dict:
    """Compute every statistic of the module docstring from a list of votes."""
    by_item: dict[int, list[Vote]] = defaultdict(list)
    by_labeler: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        by_item[vote.example_id].append(vote)
        by_labeler[vote.labeler].append(vote)
    multi = [[v.choice for v in item] for item in by_item.values() if len(item) >= 2]

    choice_of = {(v.example_id, v.labeler): v.choice for v in votes}
    pairwise = []
    for x, y in combinations(sorted(by_labeler), 2):
        shared = sorted({v.example_id for v in by_labeler[x]} & {v.example_id for v in by_labeler[y]})
        if len(shared) >= min_shared:
            kappa = cohen_kappa([choice_of[i, x] for i in shared], [choice_of[i, y] for i in shared])
            pairwise.append({"labelers": [x, y], "shared_items": len(shared), "cohen_kappa": kappa})

    labelers = []
    for name in sorted(by_labeler):
        agree = counted = 0
        for vote in by_labeler[name]:
            majority = plurality([o.choice for o in by_item[vote.example_id] if o.labeler != name])
            if majority is not None:
                counted += 1
                agree += vote.choice == majority
        mine = by_labeler[name]
        labelers.append(
            {
                "name": name,
                "votes": len(mine),
                "ties": sum(v.choice == "tie" for v in mine),
                "agreement_with_majority": agree / counted if counted else None,
                "majority_comparisons": counted,
                "mean_confidence": statistics.fmean(v.confidence for v in mine),
                **{f"position_{k}": val for k, val in _position(mine).items()},
                **{f"time_{k}": val for k, val in _times(mine).items()},
            }
        )
    return {
        "votes": len(votes),
        "items_rated": len(by_item),
        "items_with_2plus_votes": len(multi),
        "fleiss_kappa": fleiss_kappa(multi),
        "krippendorff_alpha": krippendorff_alpha(multi),
        "pairwise_cohen_kappa": pairwise,
        "position_bias": _position(votes),
        "time_per_label": _times(votes),
        "labelers": labelers,
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict, overview: dict | None = None) -> str:
    """The report as Markdown (printed by ``rlft label stats`` and shown on the UI's stats tab)."""
    lines = ["## Labeling statistics", ""]
    if overview:
        lines.append(
            f"Examples: **{overview['examples']}**, votes: **{overview['completed']}** of {overview['slots']} "
            f"planned, leased now: {overview['leased']}, labelers: {overview['labelers']}"
        )
        lines.append("")
    pos, times = report["position_bias"], report["time_per_label"]
    ci = pos["left_rate_ci95"]
    lines += [
        f"- Items with >= 2 votes: {report['items_with_2plus_votes']} (of {report['items_rated']} rated)",
        f"- Fleiss' kappa: **{_fmt(report['fleiss_kappa'])}**, "
        f"Krippendorff's alpha (nominal): **{_fmt(report['krippendorff_alpha'])}**",
        f"- Position bias (share of non-tie votes for the LEFT response; 0.5 = none): {_fmt(pos['left_rate'])}"
        + (f" [95% CI {ci[0]:.3f}-{ci[1]:.3f}], n={pos['non_tie_votes']}" if ci else ""),
        f"- Time per label: median {_fmt(times['median_s'], 1)} s, mean {_fmt(times['mean_s'], 1)} s",
        "",
        "| labeler | votes | ties | agreement w/ majority (n) | left rate | median s | mean confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for lab in report["labelers"]:
        lines.append(
            f"| {lab['name']} | {lab['votes']} | {lab['ties']} | {_fmt(lab['agreement_with_majority'])} "
            f"({lab['majority_comparisons']}) | {_fmt(lab['position_left_rate'])} | {_fmt(lab['time_median_s'], 1)} "
            f"| {_fmt(lab['mean_confidence'], 2)} |"
        )
    if report["pairwise_cohen_kappa"]:
        lines += ["", "| labeler pair | shared items | Cohen's kappa |", "|---|---|---|"]
        for pair in report["pairwise_cohen_kappa"]:
            lines.append(f"| {' / '.join(pair['labelers'])} | {pair['shared_items']} | {_fmt(pair['cohen_kappa'])} |")
    return "\n".join(lines)
