"""Metric functions against hand-computed values and independent oracles (math.comb, scikit-learn, sacrebleu)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlft.metrics import (
    auroc,
    distinct_n,
    length_stats,
    mean_pass_at_k,
    outcomes_from_scores,
    pairwise_auroc,
    pass_at_k,
    self_bleu,
    sentence_bleu,
    win_rate,
    within_group_slope,
)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: every draw of 3 contains a pass


@pytest.mark.parametrize("n,c,k", [(20, 3, 1), (20, 3, 10), (200, 17, 100), (7, 7, 7), (50, 1, 25)])
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_input_and_means_skip_impossible_k():
    with pytest.raises(ValueError, match="at least k"):
        pass_at_k(3, 1, 10)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    assert mean_pass_at_k([(2, 1), (2, 0)], [1, 2, 10]) == {"pass@1": pytest.approx(0.25), "pass@2": 0.5}


def test_auroc_hand_values_and_sklearn_oracle():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert pairwise_auroc([3.0, 2.0], [1.0, 2.5]) == pytest.approx(0.75)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # rounding creates many ties
    labels = (rng.random(300) < 0.4).astype(int)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([1.0, 2.0], [1, 1])


def test_win_rate_counts_ties_half_and_ci_matches_normal_approximation():
    result = win_rate([1, 1, 0, 0.5])
    assert (result.rate, result.wins, result.ties, result.losses, result.n) == (0.625, 2, 1, 1, 4)
    assert result.ci_low <= result.rate <= result.ci_high
    assert win_rate([1, 1, 1]).ci_low == 1.0
    outcomes = [1.0] * 240 + [0.0] * 160
    wide = win_rate(outcomes, n_bootstrap=4000)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert wide.ci_low == pytest.approx(0.6 - half_width, abs=0.01)
    assert wide.ci_high == pytest.approx(0.6 + half_width, abs=0.01)
    assert outcomes_from_scores([2.0, 1.0, 1.05], [1.0, 2.0, 1.0], tie_margin=0.1) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="1 \\(win\\)"):
        win_rate([2])


def test_within_group_slope_has_one_intercept_per_group():
    # both groups rise 2 per unit; their intercepts differ by far more than the slope explains
    values, covariate = [[2.0, 4.0, 6.0], [0.0, 2.0]], [[1.0, 2.0, 3.0], [10.0, 11.0]]
    assert within_group_slope(values, covariate) == pytest.approx(2.0)
    # a pooled fit would have found a negative slope: the later group is lower
    pooled = np.polyfit(np.concatenate(covariate), np.concatenate(values), 1)[0]
    assert pooled < 0
    # unequal slopes 1 and 3: sum(dx*dy) / sum(dx^2) over both groups = (0.5 + 1.5) / (0.5 + 0.5)
    assert within_group_slope([[0.0, 1.0], [0.0, 3.0]], [[0.0, 1.0], [0.0, 1.0]]) == pytest.approx((0.5 + 1.5) / 1.0)
    assert within_group_slope([[1.0, 2.0]], [[5.0, 5.0]]) == 0.0  # no variation in length: no correction
    with pytest.raises(ValueError, match="2 values and 1 covariates"):
        within_group_slope([[1.0, 2.0]], [[1.0]])


def test_distinct_n_hand_values():
    texts = ["a b a", "A b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n([""], 1) == 0.0


def test_sentence_bleu_matches_sacrebleu_add_one_smoothing():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyp = "the cat sat on the mat today"
    refs = ["the cat is on the mat", "a cat sat on a mat today again"]
    ours = sentence_bleu(hyp.split(), [r.split() for r in refs])
    oracle = sacrebleu.sentence_bleu(hyp, refs, smooth_method="add-k", smooth_value=1, tokenize="none").score / 100
    assert ours == pytest.approx(oracle, abs=1e-6)
    assert sentence_bleu("a b c d e".split(), ["a b c d e".split()]) == pytest.approx(1.0)


def test_self_bleu_is_one_for_copies_and_low_for_disjoint_texts():
    assert self_bleu(["the same five word text"] * 3) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four"]) == 0.0


def test_length_stats():
    stats = length_stats([1, 2, 3, 10])
    assert stats == {"mean": 4.0, "median": 2.5, "min": 1.0, "max": 10.0, "std": pytest.approx(np.std([1, 2, 3, 10]))}
