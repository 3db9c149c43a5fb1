"""pass@k, mean@n, maj@n and bootstrap confidence intervals over problems. Pure numpy.

The unbiased pass@k estimator (Chen et al. 2021, arXiv 2107.03374; ALGORITHMS.md §8): draw n >= k samples of a
problem, count c correct, then

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1 .. n} (1 - k / i)     (1 if n - c < k)

and average over problems. Never use the biased plug-in 1 - (1 - c/n)^k.

    >>> summarize_eval([{"id": "p0", "difficulty": 1, "n": 4, "c": 2}], ks=[1, 2])["pass@2"]["mean"]
    0.8333333333333334
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _check(n: int, c: int, k: int) -> None:
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass@k needs n >= 0, c >= 0, k >= 1; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples out of n={n} is impossible (c > n)")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem; got n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct out of n samples (numerically stable product form)."""
    _check(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_many(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """pass@k for many problems at once: n, c are (P,) integer arrays (n may differ per problem) -> (P,).

    Vectorised per distinct n: q_j = prod_{i = n-j+1 .. n} (1 - k/i) is a cumulative product read at j = c.
    """
    n = np.asarray(n, dtype=np.int64).reshape(-1)
    c = np.asarray(c, dtype=np.int64).reshape(-1)
    if n.shape != c.shape:
        raise ValueError(f"pass_at_k_many: n has shape {n.shape} but c has shape {c.shape}")
    bad = (n < 0) | (c < 0) | (c > n) | (k > n) | (k < 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _check(int(n[i]), int(c[i]), k)  # raises with the offending values
    out = np.ones(n.shape, dtype=np.float64)
    needs = n - c >= k  # elsewhere pass@k is exactly 1
    for n_val in np.unique(n[needs]):
        rows = needs & (n == n_val)
        # terms (1 - k/i) for i = n, n-1, ..., k+1; their cumprod at index c-1 is the product over the top c i's.
        terms = 1.0 - k / np.arange(n_val, k, -1, dtype=np.float64)
        q = np.concatenate([[1.0], np.cumprod(terms)])
        out[rows] = 1.0 - q[c[rows]]
    return out


def mean_at_n(n: np.ndarray | int, c: np.ndarray | int) -> np.ndarray | float:
    """mean@n = c / n, the average correctness of the n samples (equals the unbiased pass@1)."""
    n_arr, c_arr = np.asarray(n, dtype=np.float64), np.asarray(c, dtype=np.float64)
    if np.any(n_arr <= 0) or np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError(f"mean@n needs 0 <= c <= n and n > 0; got n={n}, c={c}")
    out = c_arr / n_arr
    return float(out) if out.ndim == 0 else out


def majority_correct(answers: Sequence[str], correct: Sequence[bool]) -> bool:
    """maj@n for one problem: is the most common answer string correct?

    Ties between equally common answers go to the answer that occurs FIRST in `answers` (sample order), which is
    deterministic and does not peek at correctness. An answer counts as correct if the majority of its samples were
    graded correct (identical strings should get identical grades; a flaky grader is resolved by vote, ties -> False).
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_correct: {len(answers)} answers but {len(correct)} grades")
    if not answers:
        raise ValueError("majority_correct: no answers")
    counts = Counter(answers)
    top = max(counts.values())
    winner = next(a for a in answers if counts[a] == top)  # first occurrence among the tied
    grades = [bool(g) for a, g in zip(answers, correct, strict=True) if a == winner]
    return 2 * sum(grades) > len(grades)


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[..., Any] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of stat(values), resampling the values (problems) with replacement.

    `stat` is called as stat(samples, axis=1) on the (n_boot, P) resample matrix when it accepts `axis`
    (np.mean, np.median, ...), otherwise once per resample.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1); got {alpha}")
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(n_boot, values.size))]  # (n_boot, P)
    try:
        stats = np.asarray(stat(samples, axis=1), dtype=np.float64)
    except TypeError:  # stat has no axis argument
        stats = np.array([stat(s) for s in samples], dtype=np.float64)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _summary(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": float(np.mean(values)), "ci_low": lo, "ci_high": hi}


def summarize_eval(problems: list[dict], ks: Sequence[int], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Aggregate per-problem sample counts into pass@k / mean@n / maj@n with 95% bootstrap CIs over problems.

    problems: dicts with "id", "difficulty", "n" (samples), "c" (correct samples) and optionally
    "majority_correct" (bool) and "reward_mean" (the mean reward of its samples, for a reward that is not the 0/1
    verdict). maj@n and reward_mean are reported only when every problem has them.
    Returns (JSON-serialisable):
        {"n_problems": P,
         "pass@1": {"mean", "ci_low", "ci_high"}, "pass@8": {...}, ...,
         "mean@n": {...}, "maj@n": {...},
         "by_difficulty": {"3": {"pass@1": mean, ..., "mean@n": mean, "maj@n": mean, "count": int}, ...}}
    All metrics use the same bootstrap resamples (same seed), so their intervals are paired.
    """
    if not problems:
        raise ValueError("summarize_eval: no problems")
    for p in problems:
        missing = [key for key in ("id", "difficulty", "n", "c") if key not in p]
        if missing:
            raise ValueError(f"summarize_eval: problem {p.get('id', p)!r} lacks {missing}")
        for k in ks:
            if k > p["n"]:
                raise ValueError(f"summarize_eval: pass@{k} needs k <= n but problem {p['id']!r} has n={p['n']}")
    n = np.array([p["n"] for p in problems])
    c = np.array([p["c"] for p in problems])
    per_problem: dict[str, np.ndarray] = {f"pass@{k}": pass_at_k_many(n, c, k) for k in ks}
    per_problem["mean@n"] = np.asarray(mean_at_n(n, c), dtype=np.float64).reshape(-1)
    for key, name in (("majority_correct", "maj@n"), ("reward_mean", "reward_mean")):
        if (column := optional_column(problems, key)) is not None:
            per_problem[name] = column

    out: dict[str, Any] = {"n_problems": len(problems)}
    for name, vals in per_problem.items():
        out[name] = _summary(vals, n_boot, seed)
    difficulty = np.array([str(p["difficulty"]) for p in problems])
    by_diff: dict[str, dict[str, float | int]] = {}
    for d in sorted(set(difficulty.tolist()), key=difficulty_order):
        rows = difficulty == d
        by_diff[d] = {name: float(vals[rows].mean()) for name, vals in per_problem.items()}
        by_diff[d]["count"] = int(rows.sum())
    out["by_difficulty"] = by_diff
    return out


def optional_column(problems: list[dict], key: str) -> np.ndarray | None:
    """The per-problem values of an optional key as floats, None when no problem has it; some but not all is an
    error (a metric over part of the problems would read as one over all)."""
    has = [key in p for p in problems]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(f"summarize_eval: problem {problems[has.index(False)]['id']!r} lacks {key!r} while others "
                         "have it")
    return np.array([float(p[key]) for p in problems])


def difficulty_order(d: str) -> tuple[int, float, str]:
    """Numeric difficulties in numeric order, then anything else alphabetically."""
    try:
        return (0, float(d), d)
    except ValueError:
        return (1, 0.0, d)
