"""Fit compute-performance curves with bootstrap CIs, test their predictivity, and compare recipes (ScaleRL §2.1/A.5).

    fit = fit_curve(C, R, "sigmoid", exclude_frac=0.1)      # C: compute per eval point, R: e.g. eval/pass@1
    fit.params["A"], fit.ci["A"]                             # asymptote and its 95% bootstrap interval
    predictivity(C, R, "sigmoid", fit_until=0.5)            # fit the first half of the compute, score the rest
    compare_fits(fit_a, fit_b)["verdict"]                    # higher A wins if beyond ±0.02 and the CIs separate

Conventions
- Warm-up exclusion (`exclude_frac`): points with C < exclude_frac * max(C) are dropped (ScaleRL fits only after
  ~1.5k GPU-hours; the early regime is noisy and fast).
- Fitting: compute is normalised by the geometric mean of its positive values and scale parameters (C_mid, D, C0)
  are fitted as logs, which is the "fit in log-C" that keeps the problem well conditioned at C ~ 1e12 FLOPs.
  scipy.optimize.curve_fit starts from a heuristic guess (A just above the best observation, C_mid where half the
  gain is reached); a grid multi-start over the asymptote and the scale (ScaleRL App. A.5 grid-searches A and C_mid)
  always runs too, batched, and the lowest sum of squares wins. If curve_fit raises, the grid result is used.
- Bootstrap: RESIDUAL bootstrap. The compute points are a fixed design chosen by the eval schedule, so we keep them
  and resample the centred residuals (inflated by sqrt(n / (n - p)) for the degrees of freedom used by the fit),
  refit every replicate from the point estimate, and report percentile intervals. Resampling points instead would
  drop the late points that pin down A. Residuals of a real run are autocorrelated and seed-to-seed variation is
  invisible to one run, so the CIs are a lower bound on the uncertainty; that is why compare_fits also applies
  ScaleRL's ±0.02 margin on A (the spread of 3 independent runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import curve_fit

from posttrain.science.curves import CURVES, CurveForm
from posttrain.science.lsq import batched_lm


@dataclass(frozen=True)
class FitResult:
    """A fitted curve. params and ci are on the raw compute axis; ci[name] = (lo, hi) percentile interval.

    n_boot_ok: bootstrap refits with a finite sum of squares (normally all of them).
    boot_params: (n_boot_ok, len(params)) bootstrap replicates in the order of CURVES[form].params (for bands).
    fixed: parameters held fixed (their CI is the point).
    at_bounds: parameters whose bootstrap interval reaches the edge of the fitter's search box: the data do not
        identify them (the curve bends outside the fitted range, or there are too few points), so their value and
        CI say where the search stopped, not what the run measured.
    """

    form: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    fitted_range: tuple[float, float]
    n_points: int
    rmse: float
    fixed: tuple[str, ...] = ()
    n_boot_ok: int = 0
    alpha: float = 0.05
    boot_params: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), repr=False, compare=False)
    at_bounds: tuple[str, ...] = ()
    box: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)  # free params' search box, raw C
    warnings: tuple[str, ...] = ()  # bound_warnings(): point estimates at the box's edge, a midpoint outside the data

    @property
    def curve(self) -> CurveForm:
        return CURVES[self.form]

    @property
    def asymptote(self) -> float:
        return self.curve.asymptote_value(self.params)

    def predict(self, C: np.ndarray | float) -> np.ndarray:
        return self.curve.fn(np.asarray(C, dtype=np.float64), **self.params)

    def band(self, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap curves at C (the point curve twice if there were none)."""
        C = np.atleast_1d(np.asarray(C, dtype=np.float64))
        if self.boot_params.shape[0] == 0:
            pred = self.predict(C)
            return pred, pred
        cols = {n: self.boot_params[:, i, None] for i, n in enumerate(self.curve.params)}
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            curves = self.curve.fn(C[None, :], **cols)  # (n_boot, len(C))
        lo, hi = np.nanquantile(curves, [self.alpha / 2, 1 - self.alpha / 2], axis=0)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "equation": self.curve.equation,
            "params": {k: float(v) for k, v in self.params.items()},
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
            "asymptote": self.asymptote,
            "fixed": list(self.fixed),
            "fitted_range": [float(self.fitted_range[0]), float(self.fitted_range[1])],
            "n_points": self.n_points,
            "rmse": float(self.rmse),
            "n_boot_ok": self.n_boot_ok,
            "at_bounds": list(self.at_bounds),
            "warnings": list(self.warnings),
        }


def get_form(form: str) -> CurveForm:
    if form not in CURVES:
        raise ValueError(f"unknown curve form {form!r}; known: {', '.join(CURVES)}")
    return CURVES[form]


def _as_xy(C: Sequence[float] | np.ndarray, R: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(C, dtype=np.float64).reshape(-1)
    R = np.asarray(R, dtype=np.float64).reshape(-1)
    if C.shape != R.shape:
        raise ValueError(f"C has {C.size} points but R has {R.size}")
    bad = ~(np.isfinite(C) & np.isfinite(R))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"non-finite point at index {i}: C={C[i]}, R={R[i]}")
    return C, R


class _Problem:
    """One form on one normalised compute axis, with fixed parameters removed and log-scale ones transformed.

    theta: (B, P_free) internal parameters; natural(theta): (B, P_all) parameters on the normalised axis.
    """

    def __init__(self, cf: CurveForm, c: np.ndarray, fixed: dict[str, float], bounded: bool):
        self.cf, self.c, self.fixed, self.bounded = cf, c, fixed, bounded
        self.free = [p for p in cf.params if p not in fixed]
        self.is_log = np.array([p in cf.log_params for p in self.free])
        lo, hi = cf.bounds(c, bounded)
        idx = [cf.params.index(p) for p in self.free]
        with np.errstate(divide="ignore", invalid="ignore"):  # np.where evaluates log on every entry
            self.lo = np.where(self.is_log, np.log(lo[idx]), lo[idx])
            self.hi = np.where(self.is_log, np.log(hi[idx]), hi[idx])

    def to_theta(self, natural: np.ndarray) -> np.ndarray:
        idx = [self.cf.params.index(p) for p in self.free]
        free = natural[:, idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = np.where(self.is_log, np.log(np.abs(free) + 1e-300), free)
        # strictly inside the box: curve_fit's trust region rejects starts on the boundary
        width = np.where(np.isfinite(self.hi - self.lo), self.hi - self.lo, 1.0)
        return np.clip(theta, self.lo + 1e-6 * width, self.hi - 1e-6 * width)

    def natural(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        out = {p: np.full(theta.shape[0], v) for p, v in self.fixed.items()}
        for j, p in enumerate(self.free):
            out[p] = np.exp(theta[:, j]) if self.is_log[j] else theta[:, j]
        return out

    def model(self, theta: np.ndarray) -> np.ndarray:
        nat = self.natural(theta)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return self.cf.fn(self.c[None, :], **{p: nat[p][:, None] for p in self.cf.params})


def _point_fit(prob: _Problem, R: np.ndarray) -> np.ndarray:
    """Best of curve_fit from the heuristic start and a batched LM from every grid start. Returns theta (P_free,)."""
    starts = prob.cf.starts(prob.c, R, prob.bounded)
    for name, value in prob.fixed.items():
        starts[:, prob.cf.params.index(name)] = value
    theta0 = prob.to_theta(starts)
    thetas, sses = [], []
    try:
        popt, _ = curve_fit(
            lambda _c, *th: prob.model(np.array([th]))[0], prob.c, R, p0=theta0[0],
            bounds=(prob.lo, prob.hi), method="trf", maxfev=1000,
        )
        thetas.append(popt)
        sses.append(float(np.sum((prob.model(popt[None, :])[0] - R) ** 2)))
    except (RuntimeError, ValueError):  # no convergence / infeasible: the grid below still gives an answer
        pass
    grid_theta, grid_sse, _ = batched_lm(prob.model, theta0, np.broadcast_to(R, (len(theta0), len(R))),
                                         prob.lo, prob.hi)
    best = int(np.argmin(grid_sse))
    thetas.append(grid_theta[best])
    sses.append(float(grid_sse[best]))
    if not np.isfinite(min(sses)):
        raise ValueError(f"{prob.cf.name} fit failed: no start gave a finite sum of squares")
    return thetas[int(np.argmin(sses))]


def fit_curve(
    C: Sequence[float] | np.ndarray,
    R: Sequence[float] | np.ndarray,
    form: str = "sigmoid",
    *,
    exclude_frac: float = 0.0,
    n_boot: int = 200,
    seed: int = 0,
    R0: float | None = None,
    bounded: bool = True,
    alpha: float = 0.05,
) -> FitResult:
    """Fit R(C) with the named form (see CURVES) and a residual-bootstrap (1 - alpha) CI for every parameter.

    exclude_frac: drop warm-up points with C < exclude_frac * max(C) before fitting.
    R0: sigmoid only; hold R0 fixed at this start value (ScaleRL uses the starting checkpoint's pass rate).
    bounded: the metric is a rate: R must lie in [0, 1] and so must A (and R0).
    """
    cf = get_form(form)
    C, R = _as_xy(C, R)
    if not 0.0 <= exclude_frac < 1.0:
        raise ValueError(f"exclude_frac must be in [0, 1); got {exclude_frac}")
    if C.size == 0:
        raise ValueError("no points to fit")
    keep = C >= exclude_frac * C.max()
    C, R = C[keep], R[keep]
    if np.any(C < 0) or (not cf.zero_C_ok and np.any(C <= 0)):
        i = int(np.flatnonzero(C <= 0)[0])
        raise ValueError(f"the {form} form needs C > 0; got C={C[i]} (drop it or raise exclude_frac)")
    if bounded and (R.min() < 0 or R.max() > 1):
        raise ValueError(f"bounded=True needs R in [0, 1]; got R in [{R.min()}, {R.max()}] (pass bounded=False)")
    fixed: dict[str, float] = {}
    if R0 is not None:
        if "R0" not in cf.params:
            raise ValueError(f"R0 can only be fixed for the sigmoid form, not {form!r}")
        fixed["R0"] = float(R0)
    n_free = len(cf.params) - len(fixed)
    if C.size < n_free + 1 or np.unique(C).size < n_free:
        raise ValueError(f"too few points for the {form} form: {C.size} points at {np.unique(C).size} distinct C "
                         f"after warm-up exclusion; it needs at least {n_free + 1}")

    C_ref = float(np.exp(np.mean(np.log(C[C > 0]))))
    prob = _Problem(cf, C / C_ref, fixed, bounded)
    theta = _point_fit(prob, R)
    fitted = prob.model(theta[None, :])[0]
    resid = R - fitted
    rmse = float(np.sqrt(np.mean(resid**2)))

    boot_theta = np.empty((0, n_free))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        centred = (resid - resid.mean()) * np.sqrt(C.size / (C.size - n_free))
        Y = fitted[None, :] + centred[rng.integers(0, C.size, size=(n_boot, C.size))]  # (n_boot, n)
        boot_theta, sse, _ = batched_lm(prob.model, np.tile(theta, (n_boot, 1)), Y, prob.lo, prob.hi)
        # Keep replicates that hit max_iter too: they started at the point estimate and only lowered their SSE, and
        # dropping the slow (hard) ones would narrow the intervals.
        boot_theta = boot_theta[np.isfinite(sse)]

    def raw(th: np.ndarray) -> dict[str, np.ndarray]:
        return cf.rescale(prob.natural(th), C_ref)

    point = {p: float(v[0]) for p, v in raw(theta[None, :]).items()}
    params = {p: point[p] for p in cf.params}
    boot = raw(boot_theta) if len(boot_theta) else {}
    ci = {}
    for p in cf.params:
        if boot and p not in fixed:
            lo, hi = np.quantile(boot[p], [alpha / 2, 1 - alpha / 2])
            ci[p] = (float(lo), float(hi))
        else:
            ci[p] = (params[p], params[p])
    boot_params = np.stack([boot[p] for p in cf.params], axis=1) if boot else np.empty((0, len(cf.params)))
    # the box on the raw axis: each bound rescaled with the other parameters at their point values (power's D
    # depends on b)
    lo_n, hi_n = cf.bounds(prob.c, bounded)
    natural = {p: float(v[0]) for p, v in prob.natural(theta[None, :]).items()}
    box = {p: tuple(float(cf.rescale({**natural, p: b[cf.params.index(p)]}, C_ref)[p]) for b in (lo_n, hi_n))
           for p in prob.free}
    fitted_range = (float(C.min()), float(C.max()))
    return FitResult(
        form=form, params=params, ci=ci, fitted_range=fitted_range, n_points=int(C.size),
        rmse=rmse, fixed=tuple(fixed), n_boot_ok=len(boot_theta), alpha=alpha, boot_params=boot_params,
        at_bounds=_at_bounds(prob, theta, boot_theta, alpha), box=box,
        warnings=tuple(bound_warnings(params, box, log_params=cf.log_params, midpoint=MIDPOINTS.get(form),
                                      fitted_range=fitted_range)),
    )


MIDPOINTS = {"sigmoid": "C_mid"}  # the compute of half the gain: a value outside the data is an extrapolation


def bound_warnings(params: dict[str, float], box: dict[str, tuple[float, float]], *,
                   log_params: Sequence[str] = (), midpoint: str | None = None,
                   fitted_range: tuple[float, float] | None = None, rtol: float = 1e-3) -> list[str]:
    """One line per fitted parameter whose point estimate lies within `rtol` of its box's width of a finite bound
    (measured in log space for the log-scale parameters), and for a `midpoint` parameter outside `fitted_range`:
    such a value says where the search stopped (or what the curve would do beyond the data), not what was measured.
    `box[name] = (lo, hi)` for the free parameters only; a fixed parameter is never at a bound."""
    out = []
    for name, (lo, hi) in box.items():
        value = params[name]
        to = (lambda v: np.log(v) if v > 0 else -np.inf) if name in log_params else (lambda v: v)
        width = to(hi) - to(lo)
        if not np.isfinite(width):
            width = 1.0 if name not in log_params else np.log(10.0)
        for side, bound in (("lower", lo), ("upper", hi)):
            if np.isfinite(to(bound)) and abs(to(value) - to(bound)) <= rtol * width:
                out.append(f"{name} = {value:.4g} is at the {side} bound {bound:.4g} of its search box: the data do "
                           "not determine it")
    if midpoint is not None and fitted_range is not None and midpoint in params:
        value, (c_lo, c_hi) = params[midpoint], fitted_range
        if not c_lo <= value <= c_hi:
            out.append(f"{midpoint} = {value:.4g} is outside the fitted data's range [{c_lo:.4g}, {c_hi:.4g}]: "
                       "the midpoint is an extrapolation")
    return out


def _at_bounds(prob: _Problem, theta: np.ndarray, boot_theta: np.ndarray, alpha: float,
               tol: float = 0.01, max_decades: float = 3.0) -> tuple[str, ...]:
    """Free parameters the data do not pin down: the point estimate or the (1 - alpha) bootstrap interval lies
    within `tol` of the search box's width from one of its edges (edges at infinity are never reached), or, for a
    scale parameter fitted on a log axis, the interval spans more than `max_decades` powers of ten."""
    sample = np.vstack([theta[None, :], boot_theta]) if len(boot_theta) else theta[None, :]
    lo_q = np.minimum(np.quantile(sample, alpha / 2, axis=0), theta)
    hi_q = np.maximum(np.quantile(sample, 1 - alpha / 2, axis=0), theta)
    out = []
    for j, p in enumerate(prob.free):
        lo, hi = prob.lo[j], prob.hi[j]
        width = hi - lo if np.isfinite(hi - lo) else np.inf
        near = (np.isfinite(lo) and lo_q[j] <= lo + tol * width) or (np.isfinite(hi) and hi_q[j] >= hi - tol * width)
        wide = bool(prob.is_log[j]) and hi_q[j] - lo_q[j] > max_decades * np.log(10)
        if (np.isfinite(width) and near) or wide:
            out.append(p)
    return tuple(out)


def holdout_errors(fit: FitResult, C: np.ndarray, R: np.ndarray) -> dict[str, Any]:
    """How well `fit` predicts held-out points: mae, rmse, max |error|, and the last point (largest C)."""
    C, R = _as_xy(C, R)
    if C.size == 0:
        raise ValueError("no held-out points to score the prediction on")
    err = fit.predict(C) - R
    last = int(np.argmax(C))
    lo, hi = fit.band(C[last])
    return {
        "n_holdout": int(C.size),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "max_abs_error": float(np.max(np.abs(err))),
        "final_C": float(C[last]),
        "final_actual": float(R[last]),
        "final_predicted": float(fit.predict(C[last])),
        "final_error": float(err[last]),
        "final_band": [float(lo[0]), float(hi[0])],
    }


def split_for_predictivity(C: np.ndarray, fit_until: float, exclude_frac: float = 0.0) -> tuple[np.ndarray, ...]:
    """Masks (fit, holdout): fit on exclude_frac*max(C) <= C <= fit_until*max(C), hold out C > fit_until*max(C).

    fit_until is a fraction of the maximum COMPUTE (ScaleRL: fit 8k of 16k GPU-hours -> 0.5), not of the points.
    """
    if not 0.0 < fit_until < 1.0:
        raise ValueError(f"fit_until must be in (0, 1); got {fit_until}")
    if not 0.0 <= exclude_frac < fit_until:
        raise ValueError(f"exclude_frac must be in [0, fit_until={fit_until}); got {exclude_frac}")
    cmax = float(np.max(C))
    cut = fit_until * cmax
    return (C >= exclude_frac * cmax) & (C <= cut), C > cut


def predictivity(
    C: Sequence[float] | np.ndarray,
    R: Sequence[float] | np.ndarray,
    form: str = "sigmoid",
    *,
    fit_until: float = 0.5,
    exclude_frac: float = 0.0,
    n_boot: int = 200,
    seed: int = 0,
    R0: float | None = None,
    bounded: bool = True,
) -> dict[str, Any]:
    """Fit on C <= fit_until * max(C) (after warm-up exclusion) and score the extrapolation on the rest.

    Returns a JSON-serialisable dict: fit_until, cutoff_C, n_fit, the holdout_errors keys, and "fit" (to_dict()).
    """
    C, R = _as_xy(C, R)
    fit_mask, hold = split_for_predictivity(C, fit_until, exclude_frac)
    fit = fit_curve(C[fit_mask], R[fit_mask], form, n_boot=n_boot, seed=seed, R0=R0, bounded=bounded)
    return {
        "fit_until": fit_until,
        "cutoff_C": fit_until * float(C.max()),
        "n_fit": fit.n_points,
        **holdout_errors(fit, C[hold], R[hold]),
        "fit": fit.to_dict(),
    }


def _separated(name: str, a: FitResult, b: FitResult, margin: float, labels: tuple[str, str]) -> tuple[str | None, str]:
    """(winner label or None, reason) for one parameter: a winner needs |diff| > margin AND disjoint CIs."""
    va, vb = a.params.get(name, a.asymptote), b.params.get(name, b.asymptote)
    (la, ha), (lb, hb) = a.ci.get(name, (va, va)), b.ci.get(name, (vb, vb))
    diff = va - vb
    shown = (f"{labels[0]} {va:.4g} [{la:.4g}, {ha:.4g}] vs {labels[1]} {vb:.4g} [{lb:.4g}, {hb:.4g}], "
             f"difference {diff:+.4g}")
    overlap = la <= hb and lb <= ha
    if abs(diff) <= margin:
        return None, f"{name} indistinguishable ({shown} is within the ±{margin:g} margin)"
    if overlap:
        return None, f"{name} indistinguishable ({shown}, but the {1 - a.alpha:.0%} CIs overlap)"
    winner = labels[0] if diff > 0 else labels[1]
    why = f"beyond the ±{margin:g} margin and " if margin > 0 else ""
    return winner, f"{winner} has higher {name} ({shown}, {why}the CIs do not overlap)"


def compare_fits(
    a: FitResult, b: FitResult, *, margin_A: float = 0.02, margin_B: float = 0.0, labels: tuple[str, str] = ("a", "b")
) -> dict[str, Any]:
    """ScaleRL's decision rule: prefer the higher asymptote A, then the higher exponent B (ALGORITHMS.md §6b).

    A differs when |A_a - A_b| > margin_A (±0.02: ScaleRL's spread over 3 seeds) AND the bootstrap CIs are disjoint;
    otherwise "A indistinguishable" and the exponent (B / b / k) is compared the same way with margin_B.
    Returns {"winner": label | None, "decided_by": "A" | exponent | None, "verdict": text saying why}.
    """
    if a.form != b.form:
        raise ValueError(f"compare fits of the same form; got {a.form!r} vs {b.form!r}")
    asym = a.curve.asymptote or "asymptote"
    exp = a.curve.exponent
    winner, why_a = _separated(asym, a, b, margin_A, labels)
    if winner is not None:
        return {"winner": winner, "decided_by": asym, "verdict": why_a}
    winner, why_b = _separated(exp, a, b, margin_B, labels)
    if winner is not None:
        return {"winner": winner, "decided_by": exp, "verdict": f"{why_a}; {why_b}"}
    return {"winner": None, "decided_by": None, "verdict": f"{why_a}; {why_b}: no winner"}
