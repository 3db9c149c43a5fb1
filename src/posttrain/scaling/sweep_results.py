"""Sweep results: reading results.csv, seed aggregation (mean and t-interval) and iso-compute comparison.

These read finished run directories and CSV files only; planning and running a sweep is scaling/sweep.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.errors import UserError
from posttrain.tracking.metrics import read_metrics

RESULTS, BY_POINT, ISO = "results.csv", "results_by_point.csv", "iso_compute"
# Not axes and not metrics: the point's name, and the machine its numbers came from (precision, CPU).
METADATA = ("point", "precision", "cpu")


def machine_of(run_dir: Path) -> str:
    """"bf16 on AMD EPYC (avx2 avx512_bf16 ...)" from a finished run's summary.json; "unknown" for a run written
    before runs recorded it."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(summary, dict) or "precision" not in summary:
        return "unknown"
    return f"{summary['precision']} on {summary.get('cpu', '?')} ({' '.join(summary.get('cpu_features') or [])})"


def check_one_machine(machines: dict[str, str], *, allow_mixed: bool, what: str) -> None:
    """UserError when the runs of one table came from different precisions or CPU kinds (their numbers differ
    beyond noise), unless the caller says that is intended."""
    kinds: dict[str, list[str]] = {}
    for run, machine in machines.items():
        kinds.setdefault(machine, []).append(run)
    if len(kinds) > 1 and not allow_mixed:
        listed = "; ".join(f"{m}: {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}" for m, runs in kinds.items())
        raise UserError(f"{what} mixes runs of different precisions or CPU kinds ({listed}); re-run them on one kind "
                        "of machine with one model.bf16, or pass --mixed-machines to compare them anyway")


def axis_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short axis labels: the last part of the key (rl.group_size -> group_size) unless two axes share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}



def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["point"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def _cell(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(csv_path: Path) -> list[dict[str, Any]]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: results file not found")
    with csv_path.open(newline="") as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def is_metric(column: str) -> bool:
    return "/" in column or column == "steps"


# --------------------------------------------------------------------------------------------------------------
# Seeds: mean and 95% t-interval per configuration


def aggregate(csv_path: Path, over: str = "seed", *, confidence: float = 0.95,
              allow_mixed: bool = False) -> list[dict[str, Any]]:
    """Mean and a `confidence` Student-t interval over `over` (an axis column) for every combination of the other
    axes; written next to csv_path as results_by_point.csv.

    Per metric, with the n runs that have it: mean, sample std s (ddof 1), and mean +- t_{(1+conf)/2, n-1} s/sqrt(n).
    The t-interval assumes roughly normal run-to-run variation; with 3 seeds it is wide (t = 4.30), which is the
    honest answer. n = 1 gives no interval (empty cells). Not clipped to [0, 1] for rates.
    """
    from scipy.stats import t as student_t

    csv_path = Path(csv_path)
    rows = read_results(csv_path)
    check_one_machine({str(r["point"]): f"{r.get('precision') or 'unknown'} on {r.get('cpu') or '?'}" for r in rows},
                      allow_mixed=allow_mixed, what=str(csv_path))
    columns = list(rows[0]) if rows else []
    axes = [c for c in columns if c not in METADATA and not is_metric(c)]
    metrics = [c for c in columns if is_metric(c)]
    if over not in axes:
        raise UserError(f"{csv_path}: cannot aggregate over {over!r}; axis columns: {', '.join(axes) or '(none)'}")
    keep = [a for a in axes if a != over]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in keep), []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = {**dict(zip(keep, key)), "n": len(members),
                               f"{over}_values": " ".join(str(m[over]) for m in members)}
        for m in metrics:
            values = np.array([r[m] for r in members if isinstance(r.get(m), int | float)], dtype=np.float64)
            if values.size == 0:
                continue
            mean = float(values.mean())
            agg[f"{m}_mean"] = mean
            if values.size > 1:
                std = float(values.std(ddof=1))
                half = float(student_t.ppf((1 + confidence) / 2, values.size - 1)) * std / math.sqrt(values.size)
                agg.update({f"{m}_std": std, f"{m}_ci_lo": mean - half, f"{m}_ci_hi": mean + half})
        out.append(agg)
    write_csv(csv_path.parent / BY_POINT, out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Iso-compute: who is best at equal FLOPs


def _curve(run_dir: Path, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the metrics rows that hold both, sorted by x; of rows at equal x the last one wins."""
    pts: dict[float, float] = {}
    for row in read_metrics(run_dir):
        vx, vy = row.get(x), row.get(y)
        if isinstance(vx, int | float) and isinstance(vy, int | float) and math.isfinite(vx) and math.isfinite(vy):
            pts[float(vx)] = float(vy)
    xs = np.array(sorted(pts))
    return xs, np.array([pts[v] for v in xs])


def _sources(runs: Path | Sequence[Path], over: str | None) -> tuple[dict[str, list[Path]], Path]:
    """-> {configuration label: run dirs}, output directory."""
    if isinstance(runs, str | Path) and (Path(runs) / RESULTS).is_file():  # a sweep directory
        sweep_dir = Path(runs)
        rows = read_results(sweep_dir / RESULTS)
        axes = [c for c in (list(rows[0]) if rows else []) if c not in METADATA and not is_metric(c)]
        if over is not None and over not in axes:
            raise UserError(f"{sweep_dir / RESULTS}: no axis {over!r} to average over; axes: {', '.join(axes)}")
        keep = [a for a in axes if a != over]
        labels = axis_labels(keep)
        groups: dict[str, list[Path]] = {}
        for row in rows:
            label = ", ".join(f"{labels[a]}={row[a]}" for a in keep) if over else str(row["point"])
            groups.setdefault(label or "all", []).append(sweep_dir / str(row["point"]))
        return groups, sweep_dir
    dirs = [Path(runs)] if isinstance(runs, str | Path) else [Path(r) for r in runs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"iso-compute: {', '.join(missing)}: no such directory (has the sweep run yet? `posttrain "
                        "sweep FILE` creates it)")
    if len(dirs) == 1 and not (dirs[0] / "metrics.jsonl").is_file():
        dirs = sorted(d for d in dirs[0].iterdir() if (d / "metrics.jsonl").is_file())
        if not dirs:
            raise UserError(f"iso-compute: {runs} holds no run directories (no */metrics.jsonl) and no {RESULTS}")
    if over is not None:
        raise UserError("iso_compute(over=...) needs a sweep directory (its results.csv names the axes)")
    return {d.name: [d] for d in dirs}, iso_output_dir(runs)


def iso_output_dir(runs: Path | Sequence[Path]) -> Path:
    """Where iso_compute writes by default: into the directory it was given (a sweep, a directory of runs, or one
    run), or for several run directories into their common parent. Never somewhere the caller did not name."""
    if isinstance(runs, str | Path):
        return Path(runs)
    paths = [Path(r) for r in runs]
    return paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))


def iso_compute(runs: Path | Sequence[Path], *, y: str = "eval/pass@1", x: str = "compute/flops",
                budgets: Sequence[float] | None = None, over: str | None = None, maximize: bool = True,
                out_dir: Path | None = None, allow_mixed: bool = False) -> list[dict[str, Any]]:
    """At each compute budget, every configuration's y interpolated at that x, and the best configuration.

    runs: a sweep directory (configurations = its points; with over="seed", the points that differ only in the
    seed are one configuration and its value is the mean over them), a directory of run dirs, or run dirs.
    Each run's curve is its metrics rows holding y, linearly interpolated in x; never extrapolated (a budget
    outside a run's [first, last] x gives NaN and that configuration is not ranked there). Default budgets: 5
    log-spaced values from the latest first evaluation to the smallest final compute over all runs.
    Writes iso_compute.csv and iso_compute.png (y against x for every run, budgets as dotted lines) in out_dir
    (default: `iso_output_dir`). Returns one dict per budget:
    {"budget", "best", "best_value", <label>: value, ...}; "best" joins exact ties with " | ".
    """
    groups, default_out = _sources(runs, over)
    check_one_machine({str(d): machine_of(d) for members in groups.values() for d in members},
                      allow_mixed=allow_mixed, what="this comparison")
    curves = {label: [(d, *_curve(d, x, y)) for d in dirs] for label, dirs in groups.items()}
    empty = [str(d) for members in curves.values() for d, xs, _ in members if xs.size == 0]
    if not curves or empty:
        columns = sorted({k for members in groups.values() for d in members for row in read_metrics(d) for k in row})
        raise UserError(f"iso_compute: no rows with both {x!r} and {y!r} in {', '.join(empty) or str(runs)}; "
                        f"columns: {', '.join(columns) or '(none)'}")
    if budgets is None:
        firsts = [xs[xs > 0][0] if (xs > 0).any() else xs[-1] for m in curves.values() for _, xs, _ in m]
        lo, hi = max(firsts), min(xs[-1] for m in curves.values() for _, xs, _ in m)
        budgets = [hi] if lo >= hi else list(np.geomspace(lo, hi, 5))
    table = []
    for b in budgets:
        row: dict[str, Any] = {"budget": float(b)}
        for label, members in curves.items():
            vals = [np.interp(b, xs, ys) if xs[0] <= b <= xs[-1] else math.nan for _, xs, ys in members]
            row[label] = float(np.mean(vals))  # NaN if any member has not reached b
        ranked = [lab for lab in curves if not math.isnan(row[lab])]
        top = (max if maximize else min)((row[lab] for lab in ranked), default=math.nan)
        best = " | ".join(lab for lab in ranked if row[lab] == top)  # exact ties are all named
        row = {"budget": row["budget"], "best": best, "best_value": top,
               **{lab: row[lab] for lab in curves}}
        table.append(row)
    out_dir = Path(out_dir) if out_dir is not None else default_out
    write_csv(out_dir / f"{ISO}.csv", table)
    _plot_iso(out_dir / f"{ISO}.png", curves, table, x=x, y=y)
    return table


def _plot_iso(png: Path, curves: dict[str, list], table: list[dict[str, Any]], *, x: str, y: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    positive = True
    for color, (label, members) in zip(colors, curves.items()):
        for j, (_, xs, ys) in enumerate(members):
            ax.plot(xs, ys, "o-", ms=3, lw=1, color=color, alpha=0.8, label=label if j == 0 else None)
            positive &= bool((xs > 0).all())
        ax.plot([r["budget"] for r in table], [r[label] for r in table], "D", ms=6, color=color, mec="k")
    for r in table:
        ax.axvline(r["budget"], color="0.6", ls=":", lw=1)
    if positive:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} at equal {x} (diamonds: interpolated at the budgets)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
