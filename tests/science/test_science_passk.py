"""pass@k / mean@n / maj@n / bootstrap CIs against exact arithmetic and hand-computed values."""

from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.science.passk import (
    bootstrap_ci,
    majority_correct,
    mean_at_n,
    pass_at_k,
    pass_at_k_many,
    summarize_eval,
)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic (math.comb is 0 when n - c < k)."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@st.composite
def nck(draw, max_n: int = 300):
    n = draw(st.integers(1, max_n))
    c = draw(st.one_of(st.just(0), st.just(n), st.integers(0, n)))  # edge cases c=0 and c=n drawn often
    k = draw(st.one_of(st.just(1), st.just(n), st.integers(1, n)))
    return n, c, k


@settings(max_examples=300, deadline=None)
@given(nck())
def test_pass_at_k_matches_exact_combinatorial_formula(args):
    n, c, k = args
    assert abs(pass_at_k(n, c, k) - float(exact_pass_at_k(n, c, k))) <= 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(nck(max_n=60), min_size=1, max_size=20), st.integers(1, 8))
def test_pass_at_k_many_matches_scalar(rows, k):
    rows = [(n, c) for n, c, _ in rows if k <= n] or [(k, 0)]
    n, c = np.array(rows).T
    got = pass_at_k_many(n, c, k)
    want = [float(exact_pass_at_k(int(ni), int(ci), k)) for ni, ci in rows]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_edge_cases_by_hand():
    assert pass_at_k(10, 0, 5) == 0.0  # no correct sample: never passes
    assert pass_at_k(10, 10, 5) == 1.0  # all correct
    assert pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k = 5: every 5-subset holds a correct one
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7, abs=1e-15)  # pass@1 = c/n
    assert pass_at_k(1000, 1, 1000) == 1.0


@pytest.mark.parametrize("n,c,k", [(5, 2, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 2, 0)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}"):
        pass_at_k(n, c, k)
    if n >= 0:
        with pytest.raises(ValueError):
            pass_at_k_many(np.array([10, n]), np.array([1, c]), k)


def test_estimator_expectation_is_exactly_one_minus_one_minus_p_to_the_k():
    """E_c[pass@k(n, c, k)] with c ~ Binomial(n, p) equals 1 - (1-p)^k: the estimator is unbiased."""
    n, k, p = 12, 5, 0.3
    pmf = [comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)]
    expected = sum(w * pass_at_k(n, c, k) for c, w in enumerate(pmf))
    assert expected == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_estimator_unbiased_monte_carlo():
    """Average the estimator over many simulated problems drawn from Bernoulli(p).

    Tolerance: 4 standard errors of the Monte-Carlo mean (sd of the estimates / sqrt(trials)); the estimates lie in
    [0, 1], so by the CLT the test fails by chance with probability ~6e-5 (and it is seeded anyway). The biased
    plug-in 1 - (1 - c/n)^k must miss by more than that tolerance, which shows the test has the power to notice bias.
    """
    rng = np.random.default_rng(0)
    n, k, p, trials = 10, 4, 0.3, 20_000
    c = (rng.random((trials, n)) < p).sum(axis=1)  # (trials,) correct samples out of n
    est = pass_at_k_many(np.full(trials, n), c, k)
    tol = 4 * est.std(ddof=1) / np.sqrt(trials)
    truth = 1 - (1 - p) ** k
    assert abs(est.mean() - truth) < tol
    biased = 1 - (1 - c / n) ** k
    assert abs(biased.mean() - truth) > tol


def test_mean_at_n():
    assert mean_at_n(8, 2) == 0.25
    np.testing.assert_array_equal(mean_at_n(np.array([4, 2]), np.array([1, 2])), [0.25, 1.0])
    with pytest.raises(ValueError):
        mean_at_n(4, 5)


def test_majority_correct_counts_and_ties():
    assert majority_correct(["4", "5", "4"], [True, False, True]) is True
    assert majority_correct(["4", "5", "5"], [True, False, False]) is False
    # tie 1-1: the answer seen first wins, whatever its grade
    assert majority_correct(["5", "4"], [False, True]) is False
    assert majority_correct(["4", "5"], [True, False]) is True
    # tie 2-2 with the correct answer first
    assert majority_correct(["7", "3", "3", "7"], [True, False, False, True]) is True
    with pytest.raises(ValueError, match="2 answers but 1 grades"):
        majority_correct(["a", "b"], [True])


def test_bootstrap_ci_contains_mean_matches_normal_theory_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.normal(0.5, 0.2, 50)
    large = rng.normal(0.5, 0.2, 2000)
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000)
    lo_l, hi_l = bootstrap_ci(large, n_boot=2000)
    assert lo_s < small.mean() < hi_s
    assert lo_l < large.mean() < hi_l
    # width shrinks like 1/sqrt(P): sqrt(2000/50) = 6.3
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4
    # and agrees with the normal-theory interval mean ± 1.96 sd / sqrt(P) to within 10%
    normal_width = 2 * 1.96 * large.std(ddof=1) / np.sqrt(large.size)
    assert (hi_l - lo_l) == pytest.approx(normal_width, rel=0.1)


def test_bootstrap_ci_constant_values_and_custom_stat():
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    lo, hi = bootstrap_ci(np.arange(11.0), stat=lambda v: float(np.max(v)), n_boot=200)  # no axis argument
    assert 5 <= lo <= hi == 10.0


def test_summarize_eval_hand_computed():
    problems = [
        {"id": "p1", "difficulty": 1, "n": 4, "c": 2, "majority_correct": True},  # pass@1 .5, pass@2 5/6
        {"id": "p2", "difficulty": 1, "n": 4, "c": 0, "majority_correct": False},  # 0, 0
        {"id": "p3", "difficulty": 2, "n": 4, "c": 4, "majority_correct": True},  # 1, 1
        {"id": "p4", "difficulty": 2, "n": 2, "c": 1, "majority_correct": False},  # .5, 1 (n - c < k)
    ]
    out = summarize_eval(problems, ks=[1, 2], n_boot=500)
    json.dumps(out)  # JSON-serialisable
    assert out["n_problems"] == 4
    assert out["pass@1"]["mean"] == pytest.approx(0.5)
    assert out["pass@2"]["mean"] == pytest.approx(17 / 24)
    assert out["mean@n"]["mean"] == pytest.approx((2 / 4 + 0 + 1 + 1 / 2) / 4)
    assert out["maj@n"]["mean"] == pytest.approx(0.5)
    for key in ("pass@1", "pass@2", "mean@n", "maj@n"):
        assert 0.0 <= out[key]["ci_low"] <= out[key]["mean"] <= out[key]["ci_high"] <= 1.0
        assert out[key]["ci_low"] < out[key]["ci_high"]
    assert out["by_difficulty"] == {
        "1": {"pass@1": 0.25, "pass@2": pytest.approx(5 / 12), "mean@n": 0.25, "maj@n": 0.5, "count": 2},
        "2": {"pass@1": 0.75, "pass@2": 1.0, "mean@n": 0.75, "maj@n": 0.5, "count": 2},
    }


def test_summarize_eval_without_majority_and_errors():
    problems = [{"id": "a", "difficulty": 10, "n": 8, "c": 8}, {"id": "b", "difficulty": 2, "n": 8, "c": 8}]
    out = summarize_eval(problems, ks=[8])
    assert "maj@n" not in out
    assert out["pass@8"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert list(out["by_difficulty"]) == ["2", "10"]  # numeric order
    with pytest.raises(ValueError, match="problem 'b' has n=4"):
        summarize_eval([problems[0], {"id": "b", "difficulty": 1, "n": 4, "c": 1}], ks=[8])
    with pytest.raises(ValueError, match="'b' lacks 'majority_correct'"):
        summarize_eval([{**problems[0], "majority_correct": True}, problems[1]], ks=[1])
    with pytest.raises(ValueError, match="'b' lacks 'reward_mean'"):
        summarize_eval([{**problems[0], "reward_mean": 0.5}, problems[1]], ks=[1])


def test_summarize_eval_averages_a_shaped_reward_per_problem_then_over_problems():
    problems = [{"id": "a", "difficulty": 1, "n": 4, "c": 2, "reward_mean": 0.3},
                {"id": "b", "difficulty": 1, "n": 4, "c": 4, "reward_mean": -0.1}]
    out = summarize_eval(problems, ks=[1])
    assert out["reward_mean"]["mean"] == pytest.approx(0.1)
    assert out["reward_mean"]["ci_low"] <= 0.1 <= out["reward_mean"]["ci_high"]
    assert out["by_difficulty"]["1"]["reward_mean"] == pytest.approx(0.1)
