"""Curve fitting: exact recovery, planted-parameter CI coverage, predictivity, and the compare_fits decision rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

import posttrain.science.fit as fit_mod
from posttrain.science.curves import CURVES, power, saturating, sigmoid
from posttrain.science.fit import compare_fits, fit_curve, predictivity
from posttrain.science.lsq import batched_lm

TRUE = {"R0": 0.2, "A": 0.6, "B": 1.8, "C_mid": 2000.0}  # ScaleRL-like: GPU-hours, pass rate 0.2 -> 0.6


def test_sigmoid_formula_by_hand():
    # at C = C_mid half the gain is reached; C -> 0 gives R0; C -> inf gives A
    assert sigmoid(np.array([2000.0]), **TRUE)[0] == pytest.approx(0.4)
    assert sigmoid(np.array([0.0]), **TRUE)[0] == pytest.approx(0.2)
    assert sigmoid(np.array([1e12]), **TRUE)[0] == pytest.approx(0.6)
    # (C_mid / C)^B = 2^1.8 at C = C_mid / 2
    assert sigmoid(np.array([1000.0]), **TRUE)[0] == pytest.approx(0.2 + 0.4 / (1 + 2**1.8))
    # ScaleRL App. A.4: for C >> C_mid the sigmoid is the power law A - D C^-B with D = (A - R0) C_mid^B
    C = np.array([1e6])
    D = (0.6 - 0.2) * 2000.0**1.8
    assert sigmoid(C, **TRUE)[0] == pytest.approx(power(C, 0.6, D, 1.8)[0], abs=1e-6)
    assert saturating(np.array([40.0]), 10.0, 0.5)[0] == pytest.approx(0.5)  # 1 - (10/40)^0.5


def test_batched_lm_solves_linear_least_squares_like_lstsq():
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, 15)
    X = np.stack([np.ones_like(x), x, x**2], axis=1)  # (15, 3)
    Y = rng.normal(size=(6, 15))  # six independent problems
    theta, sse, ok = batched_lm(lambda th: th @ X.T, np.zeros((6, 3)), Y, np.full(3, -np.inf), np.full(3, np.inf))
    want = np.linalg.lstsq(X, Y.T, rcond=None)[0].T
    np.testing.assert_allclose(theta, want, atol=1e-7)
    assert ok.all()
    np.testing.assert_allclose(sse, ((want @ X.T - Y) ** 2).sum(1), rtol=1e-9)


GPU_HOURS = np.geomspace(100, 20000, 25)
FLOPS = np.geomspace(1e13, 1e15, 25)


@pytest.mark.parametrize(
    "form,params,C",
    [
        ("sigmoid", TRUE, GPU_HOURS),
        ("sigmoid", {"R0": 0.1, "A": 0.45, "B": 0.9, "C_mid": 3e14}, FLOPS),  # raw FLOPs, mid-point late
        ("power", {"A": 0.7, "D": 2.0, "b": 0.4}, GPU_HOURS),
        ("power", {"A": 0.7, "D": 2.0 * 1e12**0.4, "b": 0.4}, GPU_HOURS * 1e12),
        ("saturating", {"C0": 10.0, "k": 0.3}, GPU_HOURS),
        ("saturating", {"C0": 1e13, "k": 0.3}, GPU_HOURS * 1e12),
    ],
)
def test_noise_free_data_recovers_parameters(form, params, C):
    R = CURVES[form].fn(C, **params)
    fit = fit_curve(C, R, form, n_boot=20)
    for name, value in params.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert fit.rmse < 1e-6
    np.testing.assert_allclose(fit.predict(C), R, atol=1e-6)


def test_fallback_when_curve_fit_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev")

    monkeypatch.setattr(fit_mod, "curve_fit", broken)
    C = np.geomspace(100, 20000, 25)
    fit = fit_curve(C, sigmoid(C, **TRUE), "sigmoid", n_boot=0)
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name


def test_R0_fixed_exclusion_and_json():
    rng = np.random.default_rng(3)
    C = np.linspace(0, 16000, 41)
    R = sigmoid(C, **TRUE) + rng.normal(0, 0.005, C.size)
    fit = fit_curve(C, R, "sigmoid", R0=0.2, exclude_frac=0.1, n_boot=50)
    assert fit.params["R0"] == 0.2 and fit.ci["R0"] == (0.2, 0.2) and fit.fixed == ("R0",)
    assert fit.fitted_range == (1600.0, 16000.0) and fit.n_points == 37  # C < 1600 dropped as warm-up
    assert fit.params["A"] == pytest.approx(0.6, abs=0.02)
    assert fit.ci["A"][0] < fit.params["A"] < fit.ci["A"][1]
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["params"]["A"] == fit.params["A"] and d["ci"]["A"] == list(fit.ci["A"])


def test_band_brackets_the_fit_and_widens_when_extrapolating():
    rng = np.random.default_rng(4)
    C = np.geomspace(100, 8000, 20)
    fit = fit_curve(C, sigmoid(C, **TRUE) + rng.normal(0, 0.01, C.size), "sigmoid", n_boot=200)
    lo, hi = fit.band(np.array([2000.0, 1e6]))
    pred = fit.predict(np.array([2000.0, 1e6]))
    assert np.all(lo <= pred) and np.all(pred <= hi)
    assert hi[1] - lo[1] > 1.5 * (hi[0] - lo[0])  # far beyond the data the asymptote is less certain


def test_input_errors():
    C = np.geomspace(100, 20000, 10)
    with pytest.raises(ValueError, match="unknown curve form 'cubic'"):
        fit_curve(C, sigmoid(C, **TRUE), "cubic")
    with pytest.raises(ValueError, match="too few points for the sigmoid form: 4 points"):
        fit_curve(C[:4], sigmoid(C[:4], **TRUE))
    with pytest.raises(ValueError, match="bounded=True needs R in"):
        fit_curve(C, 2 * sigmoid(C, **TRUE))
    with pytest.raises(ValueError, match="power form needs C > 0"):
        fit_curve(np.r_[0.0, C], np.r_[0.1, sigmoid(C, **TRUE)], "power")


def test_planted_sigmoid_parameters_inside_95pct_bootstrap_ci_in_90pct_of_trials():
    """100 seeded synthetic runs: 40 log-spaced eval points, noise sd 0.01, free R0, 400 residual-bootstrap refits.

    Per parameter the nominal coverage is 95%; a 300-trial run measured A 95.3%, B 94.3%, C_mid 96.0% (joint 88.7%),
    so >= 90% of 100 trials leaves > 2 binomial standard errors of slack. With ~12 points coverage drops to ~88%:
    percentile intervals ignore the noise in the residual scale (z instead of t), which matters only at few points.
    """
    C = np.geomspace(100, 20000, 40)
    clean = sigmoid(C, **TRUE)
    hits = {"A": 0, "B": 0, "C_mid": 0}
    joint = 0
    for trial in range(100):
        R = clean + np.random.default_rng(1000 + trial).normal(0, 0.01, C.size)
        fit = fit_curve(C, R, "sigmoid", n_boot=400, seed=trial)
        inside = {k: fit.ci[k][0] <= TRUE[k] <= fit.ci[k][1] for k in hits}
        for k, ok in inside.items():
            hits[k] += ok
        joint += all(inside.values())
    print(f"coverage of 95% CIs over 100 trials: {hits}, all three at once: {joint}")
    assert all(h >= 90 for h in hits.values()), hits
    assert joint >= 80, joint


def test_predictivity_on_clean_curve_predicts_the_tail():
    """ScaleRL's protocol: fit on the first half of the compute, extrapolate to the end (8k -> 16k GPU-hours)."""
    rng = np.random.default_rng(5)
    C = np.linspace(0, 16000, 81)
    truth = sigmoid(C, **TRUE)
    out = predictivity(C, truth + rng.normal(0, 0.002, C.size), "sigmoid", fit_until=0.5, n_boot=100)
    json.dumps(out)
    assert out["cutoff_C"] == 8000.0 and out["n_fit"] == 41 and out["n_holdout"] == 40
    assert out["final_C"] == 16000.0
    assert out["mae"] < 0.004 and out["max_abs_error"] < 0.01
    assert abs(out["final_predicted"] - truth[-1]) < 0.005  # against the noise-free truth
    assert out["final_band"][0] < out["final_predicted"] < out["final_band"][1]
    assert out["fit"]["params"]["A"] == pytest.approx(0.6, abs=0.01)


def _recipe(A: float, B: float, noise: float, seed: int):
    C = np.geomspace(100, 20000, 30)
    R = sigmoid(C, 0.2, A, B, 2000.0) + np.random.default_rng(seed).normal(0, noise, C.size)
    return fit_curve(C, R, "sigmoid", n_boot=200, seed=seed)


def test_compare_fits_clearly_higher_asymptote():
    out = compare_fits(_recipe(0.5, 1.8, 0.005, 1), _recipe(0.6, 1.8, 0.005, 2), labels=("dapo", "cispo"))
    assert out["winner"] == "cispo" and out["decided_by"] == "A"
    assert out["verdict"].startswith("cispo has higher A") and "do not overlap" in out["verdict"]


def test_compare_fits_same_asymptote_decided_by_B():
    out = compare_fits(_recipe(0.6, 3.0, 0.005, 1), _recipe(0.61, 1.0, 0.005, 2))
    assert out["winner"] == "a" and out["decided_by"] == "B"
    assert "A indistinguishable" in out["verdict"] and "within the ±0.02 margin" in out["verdict"]
    assert "a has higher B" in out["verdict"]


def test_compare_fits_overlapping_recipes_have_no_winner():
    same = compare_fits(_recipe(0.6, 1.8, 0.01, 1), _recipe(0.6, 1.8, 0.01, 2))
    assert same["winner"] is None and same["verdict"].endswith("no winner")
    assert "B indistinguishable" in same["verdict"]
    # 0.03 apart (beyond the margin) but so noisy that the A intervals overlap
    noisy = compare_fits(_recipe(0.57, 1.8, 0.06, 3), _recipe(0.6, 1.8, 0.06, 4))
    assert noisy["decided_by"] != "A"
    assert "A indistinguishable" in noisy["verdict"]
