"""The maths of adaptive curricula (data/curricula.py's samplers compose these), pure functions on plain numbers.

A prompt's history is its list of visits, (step, pass rate) pairs, oldest first (data/samplers.PromptHistory).

    recent_pass_rate  mean pass rate of the last `window` visits
    pool_of           which pool a prompt is in: new / easy / learnable / hard (the `pools` sampler)
    stayed_solved     the last `window` visits all reached the threshold (the `no_positive_resampling` sampler)
    split_counts      n draws over pools by ratio, capped by what each pool holds (largest remainder)
    logistic_*        PCL's value model: p(correct) = sigmoid(w . x), fitted online to realised pass rates
    nearest_to_target PCL's pick: the candidates whose predicted pass rate is nearest τ
    mean_abs_advantage, ucb_scores, softmax   DUMP's bandit: arm value = mean |r - mean r| of its groups
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Visits = Sequence[Sequence[float]]  # [(step, pass_rate), ...], oldest first


def recent_pass_rate(visits: Visits, window: int) -> float | None:
    """Mean pass rate of the last `window` visits; None for a prompt never visited."""
    if not visits:
        return None
    recent = visits[-window:]
    return sum(v[1] for v in recent) / len(recent)


def pool_of(visits: Visits, *, window: int, easy_at: float, hard_at: float) -> str:
    """'new' (never visited), 'easy' (recent pass rate >= easy_at), 'hard' (<= hard_at), else 'learnable'."""
    rate = recent_pass_rate(visits, window)
    if rate is None:
        return "new"
    if rate >= easy_at:
        return "easy"
    if rate <= hard_at:
        return "hard"
    return "learnable"


def stayed_solved(visits: Visits, *, threshold: float, window: int) -> bool:
    """True when the last `window` visits (at least `window` of them) each had pass rate >= threshold."""
    return len(visits) >= window and all(v[1] >= threshold for v in visits[-window:])


def split_counts(n: int, ratios: Mapping[str, float], available: Mapping[str, int]) -> dict[str, int]:
    """n draws split over pools in proportion to `ratios` (largest remainder), no pool giving more than it holds;
    what a pool cannot give goes to the others in proportion to their ratios, then to any pool with tasks left.
    The counts sum to min(n, total available)."""
    counts = {k: 0 for k in ratios}
    left = min(n, sum(available.get(k, 0) for k in ratios))
    while left > 0:
        open_ = {k: r for k, r in ratios.items() if r > 0 and counts[k] < available.get(k, 0)}
        if not open_:  # only zero-ratio pools have tasks left
            open_ = {k: 1.0 for k in ratios if counts[k] < available.get(k, 0)}
        total = sum(open_.values())
        exact = {k: left * r / total for k, r in open_.items()}
        give = {k: math.floor(x) for k, x in exact.items()}
        for k in sorted(open_, key=lambda k: (give[k] - exact[k], list(ratios).index(k)))[: left - sum(give.values())]:
            give[k] += 1  # largest remainders first, ties in the ratios' order
        for k, g in give.items():
            g = min(g, available.get(k, 0) - counts[k])
            counts[k] += g
            left -= g
    return counts


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def logistic_predict(weights: Sequence[float], features: Mapping[int, float]) -> float:
    """p = sigmoid(Σ w_i x_i) over a sparse feature vector {index: value}."""
    return sigmoid(sum(weights[i] * x for i, x in features.items()))


def logistic_update(weights: list[float], features: Mapping[int, float], target: float, *, lr: float,
                    l2: float = 0.0) -> float:
    """One SGD step on the cross-entropy between p(features) and a soft target (a realised pass rate in [0, 1]),
    in place. The gradient of the loss in w_i is (p - target) x_i (+ l2 w_i). Returns p before the step."""
    p = logistic_predict(weights, features)
    for i, x in features.items():
        weights[i] -= lr * ((p - target) * x + l2 * weights[i])
    return p


def nearest_to_target(predictions: Sequence[float], target: float, n: int) -> list[int]:
    """Indices of the n predictions nearest `target` (ties: the earlier index), in that order."""
    return sorted(range(len(predictions)), key=lambda i: (abs(predictions[i] - target), i))[:n]


def mean_abs_advantage(rewards: Sequence[float]) -> float:
    """DUMP's learnability signal of one group: mean |r_i - mean(r)|; 0 when every sample got the same reward."""
    if not rewards:
        return 0.0
    mean = sum(rewards) / len(rewards)
    return sum(abs(r - mean) for r in rewards) / len(rewards)


def ucb_scores(values: Sequence[float], counts: Sequence[int], *, c: float) -> list[float]:
    """UCB1: value_a + c sqrt(2 ln N / n_a) with N = Σ n_a; an arm never pulled scores +inf."""
    total = sum(counts)
    return [math.inf if n == 0 else v + c * math.sqrt(2 * math.log(max(total, 1)) / n)
            for v, n in zip(values, counts, strict=True)]


def softmax(scores: Sequence[float], temperature: float) -> list[float]:
    """Sampling probabilities exp(s / T) / Σ; +inf scores share all the mass equally (unexplored arms first)."""
    if any(math.isinf(s) and s > 0 for s in scores):
        inf = [1.0 if math.isinf(s) and s > 0 else 0.0 for s in scores]
        return [x / sum(inf) for x in inf]
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    return [x / sum(e) for x in e]
