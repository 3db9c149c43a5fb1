"""What the study scripts share: running posttrain one run at a time, reading eval curves, 95% t-intervals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"


def posttrain(*args: str, python: str = sys.executable) -> None:
    """One posttrain command in the foreground (never two runs at once on a 2-core machine)."""
    print("+ posttrain", " ".join(args), flush=True)
    subprocess.run([python, "-m", "posttrain.cli", *args], cwd=ROOT, check=True)


def done(name: str) -> bool:
    return (RUNS / name / "DONE").exists()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_curve(run_dir: Path, metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
    """compute/flops, elapsed seconds and each of `metrics` at every evaluation that logged all of them."""
    cols: dict[str, list[float]] = {"flops": [], "wall": [], **{m: [] for m in metrics}}
    flops = 0.0
    for row in rows(run_dir):
        flops = row.get("compute/flops", flops)
        if all(m in row for m in metrics):
            cols["flops"].append(flops)
            cols["wall"].append(row["time/elapsed_s"])
            for m in metrics:
                cols[m].append(row[m])
    return {k: np.array(v) for k, v in cols.items()}


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is nan for fewer than 2 values."""
    v = np.array(values, dtype=float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return float(v.mean()), float(half)


def ci(values: list[float]) -> str:
    mean, half = t_interval(values)
    return f"{mean:.3f} ± {half:.3f}"


def save_figure(fig, name: str) -> None:
    """docs/studies/<name>, 120 dpi."""
    fig.tight_layout()
    out = ROOT / "docs" / "studies" / name
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def study_main(run_all, report, **extra_args) -> None:
    """The command line every study shares: run what is missing (unless --report), then print the report.
    extra_args: more argparse options, {flag: help}; their values go to run_all and report as keywords."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--report", action="store_true", help="only tabulate the finished runs")
    for flag, text in extra_args.items():
        parser.add_argument(flag, help=text)
    args = vars(parser.parse_args())
    only_report = args.pop("report")
    if not only_report:
        run_all(**args)
    print(report(**args))
