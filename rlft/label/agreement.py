"""Inter-annotator agreement statistics (pure functions on labels; no database).

All coefficients return ``None`` when they are undefined (e.g. expected agreement is 1 because every rating is the
same category, or there is no item with two ratings), never NaN, so results serialise to JSON.

* :func:`cohen_kappa` — two raters on the same items: kappa = (p_o - p_e) / (1 - p_e), with p_e from each rater's own
  marginals (Cohen 1960).
* :func:`fleiss_kappa` — many raters: P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P = mean_i P_i,
  p_j = sum_i n_ij / sum_i n_i, P_e = sum_j p_j^2, kappa = (P - P_e) / (1 - P_e) (Fleiss 1971). Items may have
  different numbers of ratings n_i >= 2 (the usual generalisation; identical to Fleiss when n_i is constant).
* :func:`krippendorff_alpha` — nominal alpha = 1 - D_o / D_e from the coincidence matrix; handles any number of
  raters and missing ratings (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence


def cohen_kappa(rater1: Sequence[Hashable], rater2: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters who labeled the same items (``rater1[i]`` and ``rater2[i]`` rate item i)."""
    if len(rater1) != len(rater2):
        raise ValueError(f"both raters must rate the same items, got {len(rater1)} and {len(rater2)} labels")
    n = len(rater1)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(rater1, rater2)) / n
    m1, m2 = Counter(rater1), Counter(rater2)
    p_e = sum(m1[c] * m2[c] for c in m1) / (n * n)
    if math.isclose(p_e, 1.0):
        return None
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa; ``items[i]`` is the list of ratings item i received (items with < 2 ratings are ignored)."""
    rated = [Counter(ratings) for ratings in items if len(ratings) >= 2]
    if not rated:
        return None
    per_item = []
    totals: Counter = Counter()
    n_total = 0
    for counts in rated:
        n_i = sum(counts.values())
        per_item.append((sum(c * c for c in counts.values()) - n_i) / (n_i * (n_i - 1)))
        totals.update(counts)
        n_total += n_i
    p_bar = sum(per_item) / len(per_item)
    p_e = sum((c / n_total) ** 2 for c in totals.values())
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(items: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data; ``items[i]`` is the list of ratings unit i received."""
    coincidence: Counter = Counter()
    for ratings in items:
        m = len(ratings)
        if m < 2:
            continue  # a unit rated once carries no information about agreement
        counts = Counter(ratings)
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                pairs = n_c * (n_k - 1) if c == k else n_c * n_k  # ordered pairs of distinct ratings
                coincidence[c, k] += pairs / (m - 1)
    n_c: Counter = Counter()
    for (c, _), value in coincidence.items():
        n_c[c] += value
    n = sum(n_c.values())
    if n <= 1:
        return None
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    if math.isclose(expected, 0.0):
        return None
    return 1 - observed / expected


def plurality(ratings: Sequence[Hashable]) -> Hashable | None:
    """The single most frequent rating, or ``None`` when there is none or the top count is shared."""
    if not ratings:
        return None
    (top, top_n), *rest = Counter(ratings).most_common()
    if rest and rest[0][1] == top_n:
        return None
    return top


def mean_interval(scores: Sequence[float], z: float = 1.96) -> tuple[float, float, float] | None:
    """Mean of ``scores`` with a normal-approximation confidence interval: (mean, low, high)."""
    n = len(scores)
    if n == 0:
        return None
    mean = sum(scores) / n
    if n == 1:
        return mean, 0.0, 1.0
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)
