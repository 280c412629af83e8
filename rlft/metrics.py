"""Pure metric functions (no models): pass@k, AUROC, win rates with bootstrap CIs, Wilson intervals, the
within-group slope for length control, diversity and length statistics.

Everything here works on plain Python lists/NumPy arrays so it is easy to test against hand-computed values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: the probability that at least one of ``k`` samples drawn without
    replacement from ``n`` generated samples (``c`` of them correct) passes. Computed as a stable product
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` so large ``n`` does not overflow. https://arxiv.org/abs/2107.03374

    Args:
        n: Samples generated for the problem.
        c: Samples that passed.
        k: The k of pass@k (``k <= n``).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Average pass@k over problems given ``(n, c)`` per problem; ``k`` larger than some ``n`` is skipped."""
    out = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return out


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from average ranks (Mann-Whitney U), so it needs no scikit-learn.
    """
    scores_a, labels_a = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    n_pos, n_neg = int((labels_a == 1).sum()), int((labels_a == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative example")
    order = np.argsort(scores_a, kind="mergesort")
    ranks = np.empty(len(scores_a))
    sorted_scores = scores_a[order]
    i = 0
    while i < len(sorted_scores):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[labels_a == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def pairwise_auroc(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """AUROC of a reward model separating all chosen from all rejected responses (pooled, not per pair)."""
    return auroc(list(chosen) + list(rejected), [1] * len(chosen) + [0] * len(rejected))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (``None`` for n = 0); Wilson (1927), "Probable inference, the
    law of succession, and statistical inference" (https://doi.org/10.1080/01621459.1927.10502953).

    ``(p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes / n``: unlike the normal
    approximation it stays inside [0, 1] and is not zero-width at p = 0 or 1 (an agent that solved 4 of 4 tasks).
    """
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """Win rate of a candidate over a baseline with a percentile-bootstrap confidence interval.

    ``rate = (wins + ties / 2) / n``.
    """

    rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate(outcomes: Sequence[float], *, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate with a bootstrap CI from per-prompt outcomes (1 = win, 0.5 = tie, 0 = loss).

    Args:
        outcomes: One outcome per prompt.
        n_bootstrap: Bootstrap resamples (prompts resampled with replacement).
        confidence: Two-sided confidence level of the percentile interval.
        seed: RNG seed, so reports are reproducible.
    """
    values = np.asarray(outcomes, dtype=float)
    if values.size == 0:
        raise ValueError("win_rate needs at least one outcome")
    if not np.isin(values, (0.0, 0.5, 1.0)).all():
        raise ValueError("outcomes must be 1 (win), 0.5 (tie) or 0 (loss)")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_bootstrap, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return WinRate(
        rate=float(values.mean()),
        ci_low=float(low),
        ci_high=float(high),
        wins=int((values == 1).sum()),
        ties=int((values == 0.5).sum()),
        losses=int((values == 0).sum()),
        n=int(values.size),
    )


def outcomes_from_scores(
    candidate: Sequence[float], baseline: Sequence[float], *, tie_margin: float = 0.0
) -> list[float]:
    """Per-prompt outcomes from two score lists: win if ``candidate - baseline > tie_margin``, tie within it."""
    if len(candidate) != len(baseline):
        raise ValueError(f"score lists differ in length: {len(candidate)} vs {len(baseline)}")
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    return [1.0 if d > tie_margin else 0.0 if d < -tie_margin else 0.5 for d in diffs]


def within_group_slope(values: Sequence[Sequence[float]], covariate: Sequence[Sequence[float]]) -> float:
    """Least-squares slope of ``values`` on ``covariate`` with one intercept per group (a fixed-effects fit).

    Used for length control: the reward per word *within* each policy's own answers. A pooled fit with one intercept
    would credit length with the policies' own differences (a better policy that also writes longer would make
    length look rewarded). 0.0 when no group varies in the covariate.
    """
    if len(values) != len(covariate):
        raise ValueError(f"{len(values)} value groups vs {len(covariate)} covariate groups")
    num = den = 0.0
    for v, x in zip(values, covariate, strict=True):
        v, x = np.asarray(v, dtype=float), np.asarray(x, dtype=float)
        if v.shape != x.shape:
            raise ValueError(f"a group has {v.size} values and {x.size} covariates")
        if v.size:
            dx = x - x.mean()
            num += float((dx * (v - v.mean())).sum())
            den += float((dx * dx).sum())
    return num / den if den > 0 else 0.0


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n (Li et al., 2016): unique n-grams / total n-grams over all texts (whitespace tokens, lowercased)."""
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU of one tokenized hypothesis against tokenized references (clipped precisions, brevity penalty).

    Uses add-one smoothing for n > 1 (Lin & Och, 2004) so short texts do not collapse to 0.
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(_ngrams(hypothesis, n))
        total = sum(hyp.values())
        max_ref: Counter = Counter()
        for ref in references:
            for gram, count in Counter(_ngrams(ref, n)).items():
                max_ref[gram] = max(max_ref[gram], count)
        clipped = sum(min(c, max_ref[g]) for g, c in hyp.items())
        if n == 1:
            if clipped == 0:
                return 0.0
            precision = clipped / total
        else:
            precision = (clipped + 1) / (total + 1)
        log_precision += math.log(precision) / max_n
    ref_len = min((len(r) for r in references), key=lambda length: (abs(length - len(hypothesis)), length))
    brevity = 1.0 if len(hypothesis) > ref_len else math.exp(1 - ref_len / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al., 2018): mean BLEU of each text against all others. Higher = less diverse."""
    tokenized = [_tokens(t) for t in texts]
    if len(tokenized) < 2:
        return 0.0
    scores = [sentence_bleu(h, tokenized[:i] + tokenized[i + 1 :], max_n) for i, h in enumerate(tokenized)]
    return float(np.mean(scores))


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median, min, max and standard deviation of response lengths."""
    arr = np.asarray(lengths, dtype=float)
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0, "std": 0.0}
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "std": float(arr.std()),
    }


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1, distinct-2 and self-BLEU of a set of generations."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "self_bleu": self_bleu(texts)}
