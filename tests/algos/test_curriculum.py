"""The curricula's maths (algos/curriculum.py) against hand-computed values and properties."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrain.algos.curriculum import (
    logistic_predict,
    logistic_update,
    mean_abs_advantage,
    nearest_to_target,
    pool_of,
    recent_pass_rate,
    softmax,
    split_counts,
    stayed_solved,
    ucb_scores,
)


def test_recent_pass_rate_and_pools_on_a_hand_history():
    visits = [[1, 0.0], [3, 0.25], [7, 0.75]]
    assert recent_pass_rate(visits, 2) == pytest.approx(0.5)
    assert recent_pass_rate(visits, 10) == pytest.approx(1 / 3)
    assert recent_pass_rate([], 2) is None
    kw = {"window": 2, "easy_at": 1.0, "hard_at": 0.0}
    assert pool_of([], **kw) == "new"
    assert pool_of(visits, **kw) == "learnable"
    assert pool_of([[1, 0.5], [2, 1.0], [3, 1.0]], **kw) == "easy"  # the last two only
    assert pool_of([[1, 1.0], [2, 0.0], [3, 0.0]], **kw) == "hard"
    assert pool_of([[1, 0.875]], window=2, easy_at=0.8, hard_at=0.1) == "easy"


def test_stayed_solved_needs_window_visits_at_the_threshold():
    assert stayed_solved([[1, 1.0]], threshold=1.0, window=1)
    assert not stayed_solved([[1, 1.0]], threshold=1.0, window=2)
    assert stayed_solved([[1, 0.0], [2, 0.9], [3, 1.0]], threshold=0.9, window=2)
    assert not stayed_solved([[1, 1.0], [2, 0.5]], threshold=0.9, window=1)


def test_split_counts_by_largest_remainder_and_reassigning_what_a_pool_lacks():
    ratios = {"new": 0.3, "learnable": 0.6, "easy": 0.05, "hard": 0.05}
    assert split_counts(10, ratios, {"new": 10, "learnable": 10, "easy": 10, "hard": 10}) == \
        {"new": 3, "learnable": 6, "easy": 1, "hard": 0}  # 0.5 vs 0.5: the earlier pool wins the tie
    # only 2 learnable: the 4 left go to new/easy/hard as 0.3 : 0.05 : 0.05 = 3 : 0.5 : 0.5 -> 3, 1 (tie), 0
    assert split_counts(10, ratios, {"new": 10, "learnable": 2, "easy": 10, "hard": 10}) == \
        {"new": 6, "learnable": 2, "easy": 2, "hard": 0}
    assert split_counts(10, {"new": 0.0, "learnable": 1.0}, {"new": 10, "learnable": 3}) == {"new": 7, "learnable": 3}
    assert split_counts(10, {"new": 1.0, "learnable": 1.0}, {"new": 1, "learnable": 2}) == {"new": 1, "learnable": 2}


@given(st.integers(0, 50), st.lists(st.floats(0, 1), min_size=4, max_size=4), st.lists(st.integers(0, 30),
                                                                                     min_size=4, max_size=4))
def test_split_counts_never_overdraws_and_sums_to_what_can_be_given(n, weights, avail):
    names = ["a", "b", "c", "d"]
    ratios = dict(zip(names, weights))
    if not sum(weights):
        ratios["a"] = 1.0
    available = dict(zip(names, avail))
    counts = split_counts(n, ratios, available)
    assert sum(counts.values()) == min(n, sum(avail))
    assert all(0 <= counts[k] <= available[k] for k in names)


def test_logistic_value_model_step_by_hand():
    w = [0.0, 0.0, 0.0]
    x = {0: 1.0, 2: 2.0}
    assert logistic_predict(w, x) == 0.5
    p = logistic_update(w, x, 1.0, lr=0.1)  # gradient (p - y) x = (-0.5, 0, -1.0)
    assert p == 0.5
    assert w == pytest.approx([0.05, 0.0, 0.1])
    assert logistic_predict(w, x) == pytest.approx(1 / (1 + math.exp(-(0.05 + 0.2))))
    w = [1.0]
    logistic_update(w, {0: 1.0}, 0.0, lr=0.5, l2=0.1)  # p = sigmoid(1); w -= 0.5 (p + 0.1)
    assert w[0] == pytest.approx(1 - 0.5 * (1 / (1 + math.exp(-1)) + 0.1))


def test_value_model_converges_to_the_pass_rates_it_observes():
    w = [0.0, 0.0, 0.0]
    easy, hard = {0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0}
    for _ in range(3000):
        logistic_update(w, easy, 0.9, lr=0.2)
        logistic_update(w, hard, 0.2, lr=0.2)
    assert logistic_predict(w, easy) == pytest.approx(0.9, abs=0.01)
    assert logistic_predict(w, hard) == pytest.approx(0.2, abs=0.01)


def test_nearest_to_target_picks_closest_with_ties_to_the_earlier():
    assert nearest_to_target([0.9, 0.45, 0.55, 0.1, 0.5], 0.5, 3) == [4, 1, 2]
    assert nearest_to_target([0.2, 0.8], 0.5, 1) == [0]


def test_mean_abs_advantage_by_hand():
    assert mean_abs_advantage([1, 1, 1, 1]) == 0.0
    assert mean_abs_advantage([1, 0, 0, 0]) == pytest.approx((0.75 + 3 * 0.25) / 4)
    assert mean_abs_advantage([1, 0]) == pytest.approx(0.5)
    assert mean_abs_advantage([]) == 0.0


def test_ucb_and_softmax_by_hand():
    scores = ucb_scores([0.2, 0.4, 0.0], [3, 1, 0], c=1.0)
    assert scores[0] == pytest.approx(0.2 + math.sqrt(2 * math.log(4) / 3))
    assert scores[1] == pytest.approx(0.4 + math.sqrt(2 * math.log(4) / 1))
    assert scores[2] == math.inf
    assert softmax(scores, 0.1) == [0.0, 0.0, 1.0]  # an unexplored arm takes the whole draw
    probs = softmax([1.0, 0.0], 0.5)
    assert probs[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    assert sum(softmax([3.0, 1.0, -2.0], 0.01)) == pytest.approx(1.0)
