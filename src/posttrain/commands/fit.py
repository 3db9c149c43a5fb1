"""`posttrain fit`: fit a compute-performance curve to the metrics of finished runs, with a plot.

    posttrain fit runs/a runs/b --x compute/flops --y eval/pass@1 --form sigmoid --fit-until 0.5 --exclude-frac 0.1

Reads RUN_DIR/metrics.jsonl (one JSON object per line, e.g. {"step": 12, "compute/flops": 1.2e12,
"eval/pass@1": 0.4}); rows lacking --x or --y (training rows between evals) are skipped, and --x must increase
within a run. Points of all run dirs are POOLED into one fit: give several seeds of ONE recipe to fit its curve; to
compare recipes, fit each recipe separately and compare A (then B) with posttrain.science.fit.compare_fits.

Conventions:
- bounded fit (A and R0 in [0, 1]) when every y lies in [0, 1], i.e. the metric is a rate;
- sigmoid: R0 is held fixed at the mean y of the x = 0 rows (the starting checkpoint's eval, as in ScaleRL) when
  there are any; power/saturating drop x <= 0 rows, which they cannot represent;
- --exclude-frac drops x < exclude_frac * max(x) (warm-up); --fit-until f fits x <= f * max(x) and scores the
  extrapolation on the rest (ScaleRL fits 8k of 16k GPU-hours: --fit-until 0.5).
The plot shows the points, the fitted curve (dashed beyond the fitted range), its bootstrap band and the asymptote.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.errors import UserError
from posttrain.science.curves import CURVES
from posttrain.science.fit import FitResult, fit_curve, holdout_errors, split_for_predictivity
from posttrain.tracking.metrics import numbered_metrics

METRICS_FILE = "metrics.jsonl"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_xy(run_dir: Path, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs of one run's metrics.jsonl, skipping rows that lack either (or hold null/NaN)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a run directory?)")
    xs: list[float] = []
    ys: list[float] = []
    columns: set[str] = set()
    for lineno, row in numbered_metrics(run_dir):
        columns.update(row)
        vx, vy = row.get(x), row.get(y)
        if vx is None or vy is None:
            continue
        where = f"{path}:{lineno}"
        for name, v in ((x, vx), (y, vy)):
            if not _is_number(v):
                raise UserError(f"{where}: column {name!r} holds {v!r}, not a number")
        if not (math.isfinite(vx) and math.isfinite(vy)):
            continue
        if xs and vx == xs[-1] and vy == ys[-1]:
            continue  # the same model evaluated again at the same compute (a stage's end and the next one's start)
        if xs and vx <= xs[-1]:
            stage = row.get("stage")  # compute/<stage>_flops counts one stage's own work from zero
            hint = (f"; fit one stage's own compute instead, e.g. --x compute/{stage}_flops"
                    if stage and f"compute/{stage}_flops" != x else "")
            raise UserError(f"{where}: {x} = {vx} does not increase (previous {xs[-1]}); --x must increase "
                            f"within a run{hint}")
        xs.append(float(vx))
        ys.append(float(vy))
    for name in (x, y):
        if name not in columns:
            raise UserError(f"{path}: no column {name!r}; available: {', '.join(sorted(columns)) or '(none)'}")
    return np.array(xs), np.array(ys)


def run_fit(
    run_dirs: list[Path],
    *,
    x: str,
    y: str,
    form: str,
    fit_until: float | None,
    exclude_frac: float,
    out: Path | None,
    as_json: bool,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit `form` to the pooled (x, y) points of run_dirs, print a table (or JSON), write a PNG; return the result."""
    if not run_dirs:
        raise UserError("posttrain fit: give at least one RUN_DIR")
    if form not in CURVES:
        raise UserError(f"--form {form!r} is not a curve form; known: {', '.join(CURVES)}")
    if fit_until is not None and not 0.0 < fit_until < 1.0:
        raise UserError(f"--fit-until must be in (0, 1); got {fit_until}")
    if not 0.0 <= exclude_frac < (fit_until if fit_until is not None else 1.0):
        raise UserError(f"--exclude-frac must be in [0, {fit_until or 1}); got {exclude_frac}")
    cf = CURVES[form]
    run_dirs = [Path(d) for d in run_dirs]
    runs = [(d, *read_xy(d, x, y)) for d in run_dirs]
    C = np.concatenate([r[1] for r in runs])
    R = np.concatenate([r[2] for r in runs])
    R0 = float(R[C == 0].mean()) if form == "sigmoid" and np.any(C == 0) else None
    keep = C >= 0 if cf.zero_C_ok else C > 0
    dropped = int(np.sum(~keep))
    C, R = C[keep], R[keep]
    bounded = bool(R.size) and bool(np.all((R >= 0) & (R <= 1)))
    n_need = len(cf.params) - (R0 is not None) + 1
    where = ", ".join(str(d) for d in run_dirs)
    if C.size == 0:
        raise UserError(f"no rows with both {x!r} and {y!r} in {where}")

    def fit_or_explain(Cf: np.ndarray, Rf: np.ndarray, what: str) -> FitResult:
        if Cf.size < n_need:
            raise UserError(f"too few points to fit the {form} form on {what}: {Cf.size} (x, y) pairs in {where}; "
                            f"it needs at least {n_need}")
        try:
            return fit_curve(Cf, Rf, form, n_boot=n_boot, seed=seed, R0=R0, bounded=bounded)
        except ValueError as e:
            raise UserError(f"fitting {y} against {x} in {where}: {e}") from e

    warm = C >= exclude_frac * C.max()
    fit = fit_or_explain(C[warm], R[warm], "the points after warm-up exclusion")
    result: dict[str, Any] = {
        "x": x, "y": y, "form": form, "equation": cf.equation,
        "runs": [{"dir": str(d), "n_points": int(xs.size)} for d, xs, _ in runs],
        "n_points": int(C.size), "n_excluded_warmup": int(np.sum(~warm)), "n_dropped_nonpositive_x": dropped,
        "bounded": bounded, "R0_fixed_from_x0": R0, "fit": fit.to_dict(), "predictivity": None,
    }
    early = None
    if fit_until is not None:
        fit_mask, hold = split_for_predictivity(C, fit_until, exclude_frac)
        if not hold.any():
            raise UserError(f"--fit-until {fit_until}: no points beyond {fit_until} * max({x}) to hold out")
        early = fit_or_explain(C[fit_mask], R[fit_mask], f"{x} <= {fit_until} * max")
        result["predictivity"] = {
            "fit_until": fit_until, "cutoff_x": fit_until * float(C.max()), "n_fit": early.n_points,
            **holdout_errors(early, C[hold], R[hold]), "fit": early.to_dict(),
        }
    png = Path(out) if out is not None else run_dirs[0] / f"fit_{y.replace('/', '_')}_vs_{x.replace('/', '_')}_{form}.png"
    _plot(png, runs, fit, early, C_excluded_below=exclude_frac * C.max(), x=x, y=y, fit_until=fit_until)
    result["plot"] = str(png)
    if as_json:
        print(json.dumps(result, indent=2))
        for line in result["fit"]["warnings"]:  # also in the JSON; stderr keeps stdout parseable
            print(f"warning: {line}", file=sys.stderr)
    else:
        _print_table(result)
    return result


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    fit = result["fit"]
    console.print(f"{result['y']} vs {result['x']}: {result['equation']}")
    table = Table()
    table.add_column("param")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for name, value in fit["params"].items():
        lo, hi = fit["ci"][name]
        table.add_row(name, _fmt(value), "fixed" if name in fit["fixed"] else f"[{_fmt(lo)}, {_fmt(hi)}]")
    console.print(table)
    console.print(f"{fit['n_points']} points ({result['n_excluded_warmup']} excluded as warm-up), "
                  f"x in [{_fmt(fit['fitted_range'][0])}, {_fmt(fit['fitted_range'][1])}], rmse {_fmt(fit['rmse'])}")
    for fitted in (fit, (result["predictivity"] or {}).get("fit") or {}):
        for line in fitted.get("warnings", []):  # science/fit.py bound_warnings
            console.print(f"[yellow]warning:[/yellow] {escape(line)}{' (early-half fit)' if fitted is not fit else ''}")
        if fitted.get("at_bounds"):
            names = ", ".join(fitted["at_bounds"])
            console.print(f"[yellow]warning:[/yellow] not identified: the CI of {escape(names)} reaches the edge of "
                          f"the search box{' (early-half fit)' if fitted is not fit else ''}, so those values say "
                          "where the fitter stopped, not what the run measured. More evaluation points, a run long "
                          "enough to bend the curve, or a form with fewer parameters would fix it.")
    pred = result["predictivity"]
    if pred is not None:
        console.print(f"predictivity: fit on {result['x']} <= {_fmt(pred['cutoff_x'])} "
                      f"({pred['n_fit']} points), predict {pred['n_holdout']} held-out points")
        held = Table()
        for col in ("mae", "max |err|", "final x", "final actual", "final predicted (95% band)"):
            held.add_column(col, justify="right")
        lo, hi = pred["final_band"]
        held.add_row(_fmt(pred["mae"]), _fmt(pred["max_abs_error"]), _fmt(pred["final_C"]),
                     _fmt(pred["final_actual"]), f"{_fmt(pred['final_predicted'])} [{_fmt(lo)}, {_fmt(hi)}]")
        console.print(held)
    console.print(f"plot: {result['plot']}")


def _plot(png: Path, runs: list, fit: FitResult, early: FitResult | None, *, C_excluded_below: float, x: str,
          y: str, fit_until: float | None) -> None:
    """Points per run, the curve (solid on the fitted range, dashed beyond), bootstrap band, asymptote line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    shown = early if early is not None else fit
    all_x = np.concatenate([r[1] for r in runs])
    x_max = float(all_x.max()) * 1.3
    log_x = bool(np.all(all_x > 0)) and all_x.max() / all_x.min() > 20  # linear when x = 0 (start) is plotted
    lo_x = float(all_x[all_x > 0].min()) if log_x else 0.0
    grid = np.geomspace(lo_x, x_max, 300) if log_x else np.linspace(lo_x, x_max, 300)
    if not CURVES[shown.form].zero_C_ok:
        grid = grid[grid > 0]

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for d, xs, ys in runs:
        warm = xs < C_excluded_below
        held = xs > fit_until * all_x.max() if fit_until is not None else np.zeros(xs.size, dtype=bool)
        main = ~warm & ~held
        (pts,) = ax.plot(xs[main], ys[main], "o", ms=4, label=Path(d).name)
        ax.plot(xs[held], ys[held], "o", ms=4, mfc="none", color=pts.get_color())
        ax.plot(xs[warm], ys[warm], "o", ms=3, color="0.7")
    pred = shown.predict(grid)
    below, above = grid < shown.fitted_range[0], grid > shown.fitted_range[1]
    inside = ~below & ~above
    label = f"{shown.form} fit" + (f" on x <= {fit_until:g} max" if early is not None else "")
    ax.plot(grid[inside], pred[inside], "-", color="k", label=label)
    ax.plot(grid[above], pred[above], "--", color="k", label="extrapolation")
    ax.plot(grid[below], pred[below], "--", color="k")
    band_lo, band_hi = shown.band(grid)
    ax.fill_between(grid, band_lo, band_hi, color="k", alpha=0.15, lw=0, label="95% bootstrap band")
    if early is not None:
        ax.plot(grid, fit.predict(grid), ":", color="tab:blue", lw=1, label="fit on all points")
    A = shown.asymptote
    A_ci = shown.ci.get(shown.curve.asymptote or "", (A, A))
    ax.axhline(A, color="tab:red", ls="-.", lw=1, label=f"A = {A:.3g} [{A_ci[0]:.3g}, {A_ci[1]:.3g}]")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
