"""Agreement statistics against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import math

import pytest

from rlft.label.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    mean_interval,
    plurality,
)
from rlft.label.quality import format_report, quality_report
from rlft.label.queries import Vote
from rlft.metrics import wilson_interval


def test_cohen_kappa_two_by_two_table():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    # p_o = 35/50 = 0.7; rater1 yes = 25/50, rater2 yes = 30/50 -> p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    r1 = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    r2 = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(r1, r2) == pytest.approx(0.4)


def test_cohen_kappa_three_categories():
    # r1 = a a b b tie a ; r2 = a b b b tie tie. agree on items 1,3,4,5 -> p_o = 4/6.
    # r1 marginals a3 b2 t1, r2 a1 b3 t2 -> p_e = (3*1 + 2*3 + 1*2)/36 = 11/36. kappa = (24/36 - 11/36)/(25/36) = 13/25
    r1 = ["a", "a", "b", "b", "tie", "a"]
    r2 = ["a", "b", "b", "b", "tie", "tie"]
    assert cohen_kappa(r1, r2) == pytest.approx(13 / 25)


def test_cohen_kappa_edge_cases():
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined, not NaN
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971)-style table used on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [[cat for cat, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_small_hand_computed():
    # items: [a,a,a] P=1 ; [a,a,b] P=(4+1-3)/6=1/3 ; [b,b,tie] P=1/3. P_bar = 5/9.
    # totals a5 b3 tie1 of 9 -> P_e = (25+9+1)/81 = 35/81. kappa = (45/81 - 35/81)/(46/81) = 10/46
    items = [["a", "a", "a"], ["a", "a", "b"], ["b", "b", "tie"]]
    assert fleiss_kappa(items) == pytest.approx(10 / 46)
    assert fleiss_kappa([["a"], ["b"]]) is None


def test_krippendorff_alpha_hand_computed():
    # units: [a,a], [a,b], [b,b], [a,a,b]. Coincidences (each pair weighted 1/(m-1)):
    #   [a,a]: o_aa += 2 ; [a,b]: o_ab += 1, o_ba += 1 ; [b,b]: o_bb += 2 ;
    #   [a,a,b] (m=3, weight 1/2): ordered pairs aa:2, ab:2, ba:2 -> o_aa += 1, o_ab += 1, o_ba += 1.
    # o_aa=3, o_ab=o_ba=2, o_bb=2 ; n_a=5, n_b=4, n=9. D_o = 4 ; D_e = 2*5*4/8 = 5 ; alpha = 1 - 4/5 = 0.2
    units = [["a", "a"], ["a", "b"], ["b", "b"], ["a", "a", "b"], ["a"]]
    assert krippendorff_alpha(units) == pytest.approx(0.2)


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units with missing values,
    # nominal alpha = 0.743.
    n = None
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    units = [[x for x in unit if x is not None] for unit in zip(*observers)]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_perfect_and_undefined():
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None
    assert krippendorff_alpha([["a"]]) is None


def test_plurality_and_intervals():
    assert plurality(["a", "b", "a"]) == "a"
    assert plurality(["a", "b"]) is None
    assert plurality([]) is None
    low, high = wilson_interval(8, 10)
    # Wilson 95% for 8/10 (z=1.96): centre = (0.8 + 0.19208)/1.38416 = 0.71674 ; half = 0.22656
    assert (low, high) == pytest.approx((0.49016, 0.94331), abs=1e-4)
    scores = [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.5, 1.0]
    mean, lo, hi = mean_interval(scores)
    assert mean == pytest.approx(4.5 / 8)
    # squared deviations from 0.5625: 3 x 0.4375^2, 2 x 0.5625^2, 3 x 0.0625^2 ; sample variance divides by 7
    sd = math.sqrt((3 * 0.4375**2 + 2 * 0.5625**2 + 3 * 0.0625**2) / 7)
    assert (lo, hi) == pytest.approx((mean - 1.96 * sd / math.sqrt(8), mean + 1.96 * sd / math.sqrt(8)))
    assert mean_interval([1.0, 1.0, 0.5, 1.0])[2] == 1.0  # clipped to the [0, 1] range of a rate


def _vote(example, labeler, choice, shown, time_s=10.0, confidence=3):
    return Vote(
        example, labeler, choice, shown, shown == "right" if choice != "tie" else False, confidence, time_s, "m1", "m2"
    )


def test_quality_report_matches_hand_values():
    votes = [
        _vote(1, "ann", "a", "left", 4.0),
        _vote(1, "bob", "a", "right", 6.0),
        _vote(1, "cat", "b", "left", 8.0),
        _vote(2, "ann", "b", "left", 2.0),
        _vote(2, "bob", "b", "left", 10.0),
        _vote(2, "cat", "b", "right", 12.0),
        _vote(3, "ann", "tie", "tie", 20.0),
        _vote(3, "bob", "a", "left", 30.0),
    ]
    report = quality_report(votes)
    assert report["votes"] == 8 and report["items_rated"] == 3 and report["items_with_2plus_votes"] == 3
    items = [["a", "a", "b"], ["b", "b", "b"], ["tie", "a"]]
    assert report["fleiss_kappa"] == pytest.approx(fleiss_kappa(items))
    assert report["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(items))
    # position: non-tie votes 7, left = 5 -> 5/7
    assert report["position_bias"]["non_tie_votes"] == 7
    assert report["position_bias"]["left_rate"] == pytest.approx(5 / 7)
    assert report["time_per_label"]["median_s"] == pytest.approx(9.0)
    by_name = {lab["name"]: lab for lab in report["labelers"]}
    # ann: item1 others [a,b] no plurality (skip); item2 others [b,b] -> b agrees; item3 others [a] -> disagrees.
    assert by_name["ann"]["majority_comparisons"] == 2 and by_name["ann"]["agreement_with_majority"] == 0.5
    # cat: item1 others [a,a] -> a, cat said b (disagree); item2 others [b,b] agree -> 1/2
    assert by_name["cat"]["agreement_with_majority"] == 0.5
    # bob: item1 others [a,b] skip; item2 agree; item3 others [tie] -> disagree -> 1/2
    assert by_name["bob"]["agreement_with_majority"] == 0.5
    pairs = {tuple(p["labelers"]): p for p in report["pairwise_cohen_kappa"]}
    # ann/bob share 1,2,3: ann [a,b,tie], bob [a,b,a]
    assert pairs["ann", "bob"]["cohen_kappa"] == pytest.approx(cohen_kappa(["a", "b", "tie"], ["a", "b", "a"]))
    assert pairs["ann", "bob"]["shared_items"] == 3
    text = format_report(report, {"examples": 3, "completed": 8, "slots": 9, "leased": 0, "labelers": 3})
    assert "Fleiss" in text and "| ann | 3 |" in text
