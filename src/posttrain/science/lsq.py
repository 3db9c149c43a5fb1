"""Batched Levenberg-Marquardt: many small, independent box-bounded least-squares problems solved at once.

The bootstrap refits a curve hundreds of times and the multi-start tries ~100 starting points; looping
scipy.optimize.curve_fit over them costs seconds, while one vectorised LM over a (batch, points) array costs
milliseconds. Bounds are handled by projecting each trial step onto the box (a step is accepted only if it lowers the
sum of squares, so the iteration stays monotone).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]  # theta (B, P) -> prediction (B, M)


def _sse(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    sse = np.sum((pred - y) ** 2, axis=1)
    return np.where(np.isfinite(sse), sse, np.inf)


def _jacobian(model: Model, theta: np.ndarray) -> np.ndarray:
    """Central differences: (B, P) -> (B, M, P)."""
    h = 1e-6 * (1.0 + np.abs(theta))
    cols = []
    for j in range(theta.shape[1]):
        up, down = theta.copy(), theta.copy()
        up[:, j] += h[:, j]
        down[:, j] -= h[:, j]
        cols.append((model(up) - model(down)) / (2 * h[:, j, None]))
    return np.stack(cols, axis=-1)


def batched_lm(
    model: Model,
    theta0: np.ndarray,
    y: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    max_iter: int = 200,
    ftol: float = 1e-10,
    xtol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise sum_m (model(theta)[b, m] - y[b, m])^2 for every row b, with lo <= theta <= hi.

    theta0: (B, P) starts; y: (B, M) targets. Returns (theta (B, P), sse (B,), converged (B,) bool).
    Marquardt's damping: solve (J'J + lam * diag(J'J)) step = -J'r; lam shrinks after a good step, grows after a bad.
    """
    theta = np.clip(np.array(theta0, dtype=np.float64), lo, hi)
    y = np.asarray(y, dtype=np.float64)
    n_rows, n_par = theta.shape
    sse = _sse(model(theta), y)
    lam = np.full(n_rows, 1e-3)
    done = ~np.isfinite(sse)  # a start where the model is undefined cannot move
    converged = np.zeros(n_rows, dtype=bool)
    eye = np.eye(n_par)
    for _ in range(max_iter):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        th, ya = theta[active], y[active]
        r = model(th) - ya  # (b, M)
        J = _jacobian(model, th)  # (b, M, P)
        g = np.einsum("bmp,bm->bp", J, r)
        H = np.einsum("bmp,bmq->bpq", J, J)
        # Parameters on a bound that the gradient pushes outwards are frozen for this step (active set): otherwise
        # the unconstrained step is clipped and the other parameters' step, computed as if it moved, zigzags.
        stuck = ((th <= lo) & (g > 0)) | ((th >= hi) & (g < 0))  # (b, P)
        free = (~stuck).astype(np.float64)
        H = H * free[:, :, None] * free[:, None, :] + (1.0 - free)[:, :, None] * eye
        g = g * free
        scale = np.diagonal(H, axis1=1, axis2=2) + 1e-12  # (b, P)
        damped = H + lam[active, None, None] * scale[:, :, None] * eye
        step = -np.linalg.solve(damped, g[..., None])[..., 0]
        new = np.clip(th + step, lo, hi)
        sse_new = _sse(model(new), ya)
        old = sse[active]
        better = sse_new < old
        tiny_gain = (old - sse_new) <= ftol * np.maximum(old, 1e-300)
        tiny_step = np.all(np.abs(new - th) <= xtol * (np.abs(th) + xtol), axis=1)
        stop = (better & (tiny_gain | tiny_step)) | (old < 1e-28) | (~better & (tiny_step | (lam[active] > 1e12)))
        acc = active[better]
        theta[acc], sse[acc] = new[better], sse_new[better]
        lam[acc] /= 3.0
        lam[active[~better]] *= 4.0
        done[active[stop]] = True
        converged[active[stop]] = True
    return theta, sse, converged
