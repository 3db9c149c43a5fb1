"""Compute-performance curve forms R(C), registered by name in `CURVES`.

Each form is a pure numpy function of compute C (any positive unit: GPU-hours, FLOPs, tokens) plus the facts a
fitter needs: parameter names, starting points from data, box bounds, which parameters are positive scales (fitted
as logs), and how parameters fitted on a normalised axis c = C / C_ref map back to raw C.

    sigmoid     R = R0 + (A - R0) / (1 + (C_mid / C)^B)          ScaleRL eq. 1 (arXiv 2510.13786, ALGORITHMS.md §6a)
    power       R = A - D * C^(-b)                               the C >> C_mid limit of the sigmoid (ScaleRL App. A.4)
    saturating  R = 1 - L,  L = (C0 / C)^k                       arXiv 2509.25300 at ONE model size (ALGORITHMS.md §7)

`power` is the bounded-metric-friendly power law: it rises towards an asymptote A (instead of growing without bound
like a*C^b) and is the sigmoid's large-C tail with D = (A - R0) * C_mid^B. ScaleRL warns that power-law fits of A are
unstable (0.74 vs 0.645 for the sigmoid on the same run), so prefer the sigmoid for choosing recipes.

`saturating` is the per-size law log L = -k log C + k log C0 of Tan et al.; it is `power` with A fixed to 1. The
paper's saturation of the slope across model sizes, k(N) = k_max * N / (N + N0), can only be fitted from runs at
several model sizes N: fit k at each size with this form, then fit k(N) to those slopes.
`power` and `saturating` describe rising curves; the sigmoid also fits falling ones (A < R0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

Params = dict[str, np.ndarray | float]


def sigmoid(C: np.ndarray, R0: float, A: float, B: float, C_mid: float) -> np.ndarray:
    """ScaleRL eq. 1, computed as a logistic in log C so that C -> 0 gives R0 and large (C_mid/C)^B cannot overflow."""
    with np.errstate(divide="ignore"):
        log_c = np.log(np.asarray(C, dtype=np.float64))
    return R0 + (A - R0) * expit(B * (log_c - np.log(C_mid)))


def power(C: np.ndarray, A: float, D: float, b: float) -> np.ndarray:
    """R = A - D * C^(-b): approaches the asymptote A from below (D > 0, b > 0)."""
    return A - D * np.asarray(C, dtype=np.float64) ** (-b)


def saturating(C: np.ndarray, C0: float, k: float) -> np.ndarray:
    """R = 1 - (C0 / C)^k, the test-loss power law L = (C0/C)^k of arXiv 2509.25300 at one model size."""
    return 1.0 - (C0 / np.asarray(C, dtype=np.float64)) ** k


@dataclass(frozen=True)
class CurveForm:
    """A curve form and what a fitter needs to know about it.

    fn(C, *params) -> R.
    starts(c, R, bounded) -> (S, P) starting points on the normalised axis c = C / C_ref; row 0 is the heuristic
        guess, the other rows a grid (ScaleRL App. A.5 grid-searches A and C_mid).
    bounds(c, bounded) -> (lo, hi), each (P,), on the normalised axis.
    log_params: positive scale parameters, fitted as their logarithm.
    rescale(params, C_ref) -> params for raw C (works elementwise on arrays of bootstrap parameters).
    asymptote: the parameter holding the asymptote, or None when it is fixed at 1.
    exponent: the efficiency exponent (ScaleRL's B), compared when asymptotes are indistinguishable.
    zero_C_ok: whether C = 0 points are allowed (the sigmoid's value there is R0).
    """

    name: str
    params: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    starts: Callable[[np.ndarray, np.ndarray, bool], np.ndarray]
    bounds: Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray]]
    log_params: tuple[str, ...]
    rescale: Callable[[Params, float], Params]
    asymptote: str | None
    exponent: str
    equation: str
    zero_C_ok: bool = False

    def asymptote_value(self, params: dict[str, float]) -> float:
        return float(params[self.asymptote]) if self.asymptote else 1.0


def _rising(c: np.ndarray, R: np.ndarray) -> bool:
    order = np.argsort(c)
    q = max(1, len(R) // 4)
    return float(np.mean(R[order][-q:])) >= float(np.mean(R[order][:q]))


def _asymptote_grid(R: np.ndarray, rising: bool, bounded: bool, n: int = 6) -> np.ndarray:
    """Candidate asymptotes: from the most extreme observation to one observed range beyond it."""
    lo, hi = float(R.min()), float(R.max())
    span = max(hi - lo, 1e-3)
    grid = np.linspace(hi, hi + span, n) if rising else np.linspace(lo, lo - span, n)
    return np.clip(grid, 0.0, 1.0) if bounded else grid


def _crossing(c: np.ndarray, R: np.ndarray, level: float, rising: bool) -> float:
    """First c (log-interpolated) at which R crosses `level`; the largest c if it never does."""
    order = np.argsort(c)
    cs, rs = c[order], R[order]
    past = rs >= level if rising else rs <= level
    if not past.any():
        return float(cs[-1])
    i = int(np.argmax(past))
    if i == 0 or cs[i - 1] <= 0:
        return float(cs[i]) if cs[i] > 0 else float(cs[cs > 0].min())
    w = (level - rs[i - 1]) / (rs[i] - rs[i - 1]) if rs[i] != rs[i - 1] else 0.5
    return float(np.exp(np.log(cs[i - 1]) + w * (np.log(cs[i]) - np.log(cs[i - 1]))))


def _positive_range(c: np.ndarray) -> tuple[float, float]:
    pos = c[c > 0]
    return float(pos.min()), float(pos.max())


# ---- sigmoid ------------------------------------------------------------------------------------------------------
def _sigmoid_starts(c: np.ndarray, R: np.ndarray, bounded: bool) -> np.ndarray:
    rising = _rising(c, R)
    R0 = float(R[np.argsort(c)][0])
    A = float(_asymptote_grid(R, rising, bounded)[1])
    c_mid = _crossing(c, R, R0 + (A - R0) / 2, rising)
    guess = [R0, A, 1.5, c_mid]
    cmin, cmax = _positive_range(c)
    grid = [
        [R0, a, b, m]
        for a in _asymptote_grid(R, rising, bounded)
        for m in np.geomspace(cmin / 10, cmax * 10, 8)
        for b in (0.7, 2.0)
    ]
    return np.array([guess, *grid])


def _sigmoid_bounds(c: np.ndarray, bounded: bool) -> tuple[np.ndarray, np.ndarray]:
    cmin, cmax = _positive_range(c)
    r_lo, r_hi = (0.0, 1.0) if bounded else (-np.inf, np.inf)
    return np.array([r_lo, r_lo, 0.05, cmin / 100]), np.array([r_hi, r_hi, 10.0, cmax * 100])


def _sigmoid_rescale(p: Params, C_ref: float) -> Params:
    return {**p, "C_mid": p["C_mid"] * C_ref}


# ---- power --------------------------------------------------------------------------------------------------------
def _power_starts(c: np.ndarray, R: np.ndarray, bounded: bool) -> np.ndarray:
    order = np.argsort(c)
    c_first, R_first = float(c[order][0]), float(R[order][0])
    def row(A: float, b: float) -> list[float]:  # D chosen so that the curve passes through the first point
        return [A, max(A - R_first, 1e-3) * c_first**b, b]

    grid = _asymptote_grid(R, True, bounded)
    return np.array([row(grid[1], 0.5)] + [row(A, b) for A in grid for b in (0.1, 0.3, 0.7, 1.5)])


def _power_bounds(c: np.ndarray, bounded: bool) -> tuple[np.ndarray, np.ndarray]:
    a_lo, a_hi = (0.0, 1.0) if bounded else (-np.inf, np.inf)
    return np.array([a_lo, 1e-12, 1e-3]), np.array([a_hi, 1e12, 5.0])


def _power_rescale(p: Params, C_ref: float) -> Params:
    # D' (C / C_ref)^-b = D' C_ref^b C^-b
    return {**p, "D": p["D"] * C_ref ** p["b"]}


# ---- saturating ---------------------------------------------------------------------------------------------------
def _saturating_starts(c: np.ndarray, R: np.ndarray, bounded: bool) -> np.ndarray:
    L = np.clip(1.0 - R, 1e-6, None)
    slope, intercept = np.polyfit(np.log(c), np.log(L), 1)  # log L = -k log c + k log C0
    k = float(np.clip(-slope, 0.01, 4.0))
    guess = [float(np.exp(intercept / k)), k]
    i_med = int(np.argsort(c)[len(c) // 2])
    grid = [[float(c[i_med] * L[i_med] ** (1.0 / kk)), kk] for kk in (0.03, 0.1, 0.3, 1.0, 2.0)]
    return np.array([guess, *grid])


def _saturating_bounds(c: np.ndarray, bounded: bool) -> tuple[np.ndarray, np.ndarray]:
    return np.array([1e-30, 1e-3]), np.array([1e30, 5.0])


def _saturating_rescale(p: Params, C_ref: float) -> Params:
    return {**p, "C0": p["C0"] * C_ref}


CURVES: dict[str, CurveForm] = {
    "sigmoid": CurveForm(
        name="sigmoid", params=("R0", "A", "B", "C_mid"), fn=sigmoid, starts=_sigmoid_starts,
        bounds=_sigmoid_bounds, log_params=("C_mid",), rescale=_sigmoid_rescale, asymptote="A", exponent="B",
        equation="R = R0 + (A - R0) / (1 + (C_mid / C)^B)", zero_C_ok=True,
    ),
    "power": CurveForm(
        name="power", params=("A", "D", "b"), fn=power, starts=_power_starts, bounds=_power_bounds,
        log_params=("D",), rescale=_power_rescale, asymptote="A", exponent="b", equation="R = A - D * C^(-b)",
    ),
    "saturating": CurveForm(
        name="saturating", params=("C0", "k"), fn=saturating, starts=_saturating_starts, bounds=_saturating_bounds,
        log_params=("C0",), rescale=_saturating_rescale, asymptote=None, exponent="k",
        equation="R = 1 - (C0 / C)^k",
    ),
}
