"""Read a run directory for the report, tolerantly: a missing or damaged file yields an empty field (and a note),
never an exception, so a half-finished run still gets a report of what it has.

Also the one piece of arithmetic the report owns: pass@k for every k in 1..n from per-problem counts, the
"does RL expand the reasoning boundary?" curve (Yue et al. 2025, arXiv 2504.13837).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.science.passk import bootstrap_ci, difficulty_order, pass_at_k_many
from posttrain.tracking.metrics import read_metrics

# metrics.jsonl stores +-inf as +-1e308 (tracking.metrics._clean); anything this large is not a plottable number.
_HUGE = 1e300
STAGE_ORDER = {"base": 0, "sft": 1, "rl": 2}


@dataclass
class RunData:
    """Everything the report reads from one run directory."""

    path: Path
    name: str  # legend label: the directory name, disambiguated by its parent when two runs share a name
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in file order
    config: dict[str, Any] = field(default_factory=dict)  # config.json["config"]
    meta: dict[str, Any] = field(default_factory=dict)  # config.json["meta"]
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval/*.json, sorted by (step, stage, tag)
    adhoc: list[dict[str, Any]] = field(default_factory=list)  # eval/adhoc/*.json: `posttrain eval` results
    summary: dict[str, Any] | None = None  # summary.json; None while the run is unfinished
    notes: list[str] = field(default_factory=list)  # what could not be read, shown in the HTML


def number(value: Any) -> float | None:
    """A finite float, or None for null / NaN / the +-1e308 that stands for infinity / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and abs(value) < _HUGE else None


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name}: unreadable ({e})")
        return None


def _eval_sort_key(result: dict[str, Any]) -> tuple[float, int, str]:
    step = number(result.get("step"))
    return (step if step is not None else math.inf, STAGE_ORDER.get(str(result.get("stage")), 3),
            str(result.get("tag", "")))


def load_run(path: Path, name: str | None = None) -> RunData:
    path = Path(path)
    run = RunData(path=path, name=name or path.resolve().name)
    run.rows = read_metrics(path, notes=run.notes)
    cfg = _read_json(path / "config.json", run.notes)
    if isinstance(cfg, dict):
        run.config = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
        run.meta = cfg.get("meta") if isinstance(cfg.get("meta"), dict) else {}
    summary = _read_json(path / "summary.json", run.notes)
    run.summary = summary if isinstance(summary, dict) else None
    evals = []
    for f in sorted((path / "eval").glob("*.json")) if (path / "eval").is_dir() else []:
        result = _read_json(f, run.notes)
        if isinstance(result, dict):
            result.setdefault("tag", f.stem)
            evals.append(result)
    run.evals = sorted(evals, key=_eval_sort_key)
    for f in sorted((path / "eval" / "adhoc").glob("*.json")) if (path / "eval" / "adhoc").is_dir() else []:
        result = _read_json(f, run.notes)
        if isinstance(result, dict):
            result["file"] = f.name
            run.adhoc.append(result)
    if not run.rows:
        run.notes.append("metrics.jsonl: missing or empty")
    return run


def run_names(paths: list[Path]) -> list[str]:
    """Directory names as legend labels; names that collide get their parent prepended (a/seed0, b/seed0)."""
    names = [p.resolve().name for p in paths]
    out = []
    for p, n in zip(paths, names, strict=True):
        out.append(f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n)
    for i, n in enumerate(out):  # still colliding (same dir twice): number them
        if out.count(n) > 1:
            out[i] = f"{n} #{out[:i].count(n) + 1}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Series from metrics.jsonl


STAGE_STEP = "stage_step"  # x axis: steps since the row's stage started (RL step 0 = the end of SFT)


def stage_starts(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The global step at which each training stage started: the last step of the stages before it (0 for the
    first). Seed-dependent SFT lengths then do not shift the RL curves of different runs apart."""
    starts: dict[str, float] = {}
    last = 0.0
    for row in sorted((r for r in rows if number(r.get("step")) is not None), key=lambda r: number(r["step"])):
        stage = row.get("stage")
        if stage not in (None, "base") and stage not in starts:
            starts[str(stage)] = last
        last = number(row["step"])
    return starts


def series(rows: list[dict[str, Any]], key: str, *, x: str = "step", stages: tuple[str, ...] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every row that has a finite `key` and a finite `x` (and, if given, a stage in `stages`),
    sorted by x. x is "step" (global), STAGE_STEP (steps since the row's stage started) or a column; for a compute
    column only x > 0 is kept when any x > 0 (a log axis), else all."""
    starts = stage_starts(rows) if x == STAGE_STEP else {}
    pts = []
    for row in rows:
        if stages is not None and row.get("stage") not in stages:
            continue
        if x == STAGE_STEP:
            step = number(row.get("step"))
            xv = None if step is None or row.get("stage") not in starts else step - starts[row["stage"]]
        else:
            xv = number(row.get(x))
        yv = number(row.get(key))
        if xv is None or yv is None:
            continue
        pts.append((xv, yv))
    if not pts:
        return np.zeros(0), np.zeros(0)
    pts.sort(key=lambda p: p[0])  # stable: rows with equal x keep file order
    arr = np.array(pts, dtype=np.float64)
    if x not in ("step", STAGE_STEP) and np.any(arr[:, 0] > 0):
        arr = arr[arr[:, 0] > 0]
    return arr[:, 0], arr[:, 1]


def stage_boundaries(rows: list[dict[str, Any]], *, x: str = "step") -> list[tuple[float, str]]:
    """(x, new_stage) where the training stage changes (sft -> rl, ...). The 'base' rows (the evaluation of the
    starting model) are not a training stage and draw no line."""
    out: list[tuple[float, str]] = []
    prev = None
    for row in sorted((r for r in rows if number(r.get("step")) is not None), key=lambda r: number(r["step"])):
        stage = row.get("stage")
        if stage in (None, "base"):
            continue
        if prev is not None and stage != prev:
            xv = number(row.get(x))
            if xv is not None and (x == "step" or xv > 0):
                out.append((xv, str(stage)))
        prev = stage
    return out


EVAL_KEY = re.compile(r"^eval/(.+)$")


def eval_metric_names(runs: list[RunData]) -> list[str]:
    """Eval metric names present in any run (metrics rows or eval files): greedy_acc, pass@1, pass@8, mean@n..."""
    found: set[str] = set()
    for run in runs:
        for row in run.rows:
            for k, v in row.items():
                m = EVAL_KEY.match(k)
                if m and number(v) is not None:
                    found.add(m.group(1))
        for result in run.evals:
            if number(result.get("greedy_acc")) is not None:
                found.add("greedy_acc")
            found.update(k for k, v in result.items() if isinstance(v, dict) and number(v.get("mean")) is not None)
            for label, suite in (result.get("suites") or {}).items():
                if isinstance(suite, dict):
                    found.update(f"{label}/{k}" for k, v in suite.items()
                                 if k != "mean@n" and isinstance(v, dict) and number(v.get("mean")) is not None)
    found.discard("mean@n")
    found -= {m for m in found if m.endswith("/mean@n")}  # pass@1 by definition: the same numbers under another name
    return sorted(found, key=_eval_metric_order)


def _eval_metric_order(name: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"pass@(\d+)", name)
    if name == "greedy_acc":
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)


def eval_points(run: RunData, metric: str) -> list[tuple[float, float, float | None, float | None]]:
    """(step, value, ci_low, ci_high) of one eval metric over steps. Eval files (which carry the bootstrap CI)
    win; metrics.jsonl rows fill the steps no file covers (e.g. periodic greedy accuracy during SFT)."""
    pts: dict[float, tuple[float, float, float | None, float | None]] = {}
    for result in run.evals:
        step = number(result.get("step"))
        entry = result.get(metric)
        label, _, rest = metric.partition("/")
        if entry is None and rest and isinstance(result.get("suites"), dict):  # a transfer suite's own result
            suite = result["suites"].get(label)
            entry = suite.get(rest) if isinstance(suite, dict) else None
        if step is None:
            continue
        if isinstance(entry, dict) and number(entry.get("mean")) is not None:
            pts[step] = (step, number(entry["mean"]), number(entry.get("ci_low")), number(entry.get("ci_high")))
        elif number(entry) is not None:
            pts[step] = (step, number(entry), None, None)
    xs, ys = series(run.rows, f"eval/{metric}")
    for step, value in zip(xs.tolist(), ys.tolist(), strict=True):
        pts.setdefault(step, (step, value, None, None))
    return [pts[s] for s in sorted(pts)]


# ---------------------------------------------------------------------------------------------------------------
# pass@k for every k


def _counts(per_problem: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(n, c) of the problems that have usable counts (integers with 0 <= c <= n, n >= 1)."""
    n, c = [], []
    for p in per_problem or []:
        if not isinstance(p, dict):
            continue
        pn, pc = number(p.get("n")), number(p.get("c"))
        if pn is None or pc is None or pn < 1 or not 0 <= pc <= pn or pn != int(pn) or pc != int(pc):
            continue
        n.append(int(pn))
        c.append(int(pc))
    return np.array(n, dtype=np.int64), np.array(c, dtype=np.int64)


def passk_matrix(per_problem: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """ks = 1..min(n) and the (K, P) matrix of per-problem unbiased pass@k. Empty when no problem has counts."""
    n, c = _counts(per_problem)
    if n.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    ks = np.arange(1, int(n.min()) + 1)
    return ks, np.stack([pass_at_k_many(n, c, int(k)) for k in ks])


def passk_curve(per_problem: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """pass@k averaged over problems for EVERY k in 1..n, from per-problem sample counts.

    per_problem: [{"n": samples, "c": correct, ...}, ...] as in eval/<tag>.json. Returns (ks, means) with
    ks = 1..min_n (when problems drew different n, k stops at the smallest). Problems without usable counts are
    skipped; none at all gives two empty arrays.

        >>> passk_curve([{"n": 4, "c": 1}, {"n": 4, "c": 4}])[1].tolist()
        [0.625, 0.75, 0.875, 1.0]
    """
    ks, m = passk_matrix(per_problem)
    return ks, (m.mean(axis=1) if m.size else np.zeros(0))


def passk_band(per_problem: list[dict[str, Any]], *, n_boot: int = 500, seed: int = 0,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """95% bootstrap band over problems for passk_curve: (ks, lo, hi). The same seed at every k resamples the
    same problems, so the band is a coherent set of curves rather than independent per-k intervals."""
    ks, m = passk_matrix(per_problem)
    if m.size == 0 or m.shape[1] < 2:
        return ks, np.zeros(0), np.zeros(0)
    lo, hi = zip(*(bootstrap_ci(row, n_boot=n_boot, seed=seed) for row in m), strict=True)
    return ks, np.array(lo), np.array(hi)


def difficulty_table(result: dict[str, Any], metric: str = "pass@1") -> list[tuple[str, float, int | None]]:
    """(difficulty, accuracy, count) from an eval file's by_difficulty, in numeric difficulty order."""
    by = result.get("by_difficulty")
    if not isinstance(by, dict):
        return []
    out = []
    for level, entry in by.items():
        if not isinstance(entry, dict):
            continue
        value = number(entry.get(metric, entry.get("mean@n")))
        if value is None:
            continue
        count = number(entry.get("count"))
        out.append((str(level), value, int(count) if count is not None else None))
    return sorted(out, key=lambda t: difficulty_order(t[0]))
