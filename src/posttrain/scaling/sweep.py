"""Sweeps: many ordinary runs over declared axes, one results table, seed CIs and iso-compute comparisons.

    posttrain sweep recipes/scaling/ladder.toml            # run (or resume) every point, one after another
    posttrain sweep recipes/scaling/ladder.toml --plan     # validate and list the points, run nothing

A sweep file (docs/sweeps.md):

    base = "../quickstart.toml"          # a recipe, relative to this file
    name = "ladder"                      # points are named ladder-group_size=4-seed=0, ...
    output_dir = "runs/ladder"           # optional (default runs/<name>, relative to the working directory)
    [axes]                               # dotted recipe keys -> values; the points are the cartesian product
    "rl.group_size" = [4, 8, 16]
    seed = [0, 1, 2]
    [set]                                # optional fixed overrides on top of the base recipe
    "rl.steps" = 100

Every point is validated before anything runs (an unknown key, a bad value, more than MAX_POINTS points, counted
before they are expanded, a point directory whose config.json or summary.json is damaged, or a finished point
whose saved config no longer matches is an error naming it). Each point is an ordinary run directory in
output_dir; a finished one (DONE marker) is skipped on re-run and an unfinished one resumes from its newest
checkpoint (runner.py). SIGTERM stops the sweep as it stops a run: the current point checkpoints and stops, no
later point starts, exit 143.
results.csv (one row per finished point) is rebuilt from the run directories after every point, so it is always
consistent with them. Columns: `point`, one per axis (the dotted key), then metrics, whose names contain "/"
(`eval/pass@1` of the last stage's final evaluation, `compute/*` and `time/elapsed_s` of the last metrics row)
plus `steps`. That naming rule is how aggregate() tells axes from metrics.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from posttrain.config import RunConfig, read_toml, resolve_paths, set_path, validate
from posttrain.errors import RunStopped, UserError
from posttrain.rundir import DONE, diff_keys
from posttrain.runner import StopOnSigterm, run
from posttrain.scaling.sweep_results import (
    BY_POINT,
    ISO,
    RESULTS,
    aggregate,
    axis_labels,
    iso_compute,
    write_csv,
)
from posttrain.stages import load_stages
from posttrain.tracking.metrics import read_metrics

SWEEP_KEYS = ("base", "name", "axes", "set", "output_dir")
RESERVED = ("name", "output_dir")  # the sweep decides where each point lives
MAX_POINTS = 10_000  # each point is a whole run; a product of axes past this is a mistake, refused before expanding


@dataclass(frozen=True)
class Point:
    name: str
    values: dict[str, Any]  # axis key -> value, in axis order
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def done(self) -> bool:
        return (self.run_dir / DONE).exists()


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    axes: dict[str, list[Any]]
    fixed: dict[str, Any]
    output_dir: Path
    points: list[Point]

    @property
    def results_csv(self) -> Path:
        return self.output_dir / RESULTS


# --------------------------------------------------------------------------------------------------------------
# Planning: read, validate, expand


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted recipe key, or UserError naming the first part that is not a key."""
    model: Any = RunConfig
    stages = load_stages()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if i == 0 and part in stages and part not in RunConfig.model_fields:  # a stage's section ([rl])
            model = stages.get(part).config
        elif isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                where = ".".join(parts[:i]) or "the top level"
                known = ", ".join(sorted([*model.model_fields, *(stages.names() if i == 0 else [])]))
                raise UserError(f"{dotted!r} is not a recipe key ({part!r} is not in {where}; known: {known})")
            model = model.model_fields[part].annotation
        elif typing.get_origin(model) is dict or model is dict:
            return Any  # inside a free-form table such as env.args
        else:
            raise UserError(f"{dotted!r} is not a recipe key ({'.'.join(parts[:i])} is not a section)")
    return model


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _flatten(table: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """{'rl': {'lr': x}} or {'rl.lr': x} -> {'rl.lr': x}: nested TOML tables down to recipe keys (env.args stays a
    value, because it is a key, not a section)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = prefix + k
        try:
            annotation = _field_type(key)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if isinstance(v, dict) and _is_section(annotation):
            out.update(_flatten(v, where, key + "."))
        elif _is_section(annotation):
            raise UserError(f"{where}: {key!r} is a whole section; set keys inside it (e.g. '{key}.<key>')")
        else:
            out[key] = v
    return out


def _fmt(value: Any) -> str:
    """An axis value as it appears in point names and in the CSV."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))




def _resolve_value(dotted: str, value: Any, base: Path) -> Any:
    """An axis or [set] value with its paths resolved as a recipe's would be at that key."""
    *parents, leaf = dotted.split(".")
    tree: Any = {leaf: value}
    for parent in reversed(parents):
        tree = {parent: tree}
    tree = resolve_paths(tree, base)
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every point's config is validated here, before anything runs."""
    path = Path(path)
    raw = read_toml(path, missing=f"{path}: sweep file not found")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown top-level key {unknown[0]!r}; a sweep has {', '.join(SWEEP_KEYS)}")
    for key, kind in (("base", str), ("name", str), ("axes", dict), ("set", dict), ("output_dir", str)):
        if key in raw and not isinstance(raw[key], kind):
            raise UserError(f"{path}: {key} must be a {'table' if kind is dict else 'string'}, got {raw[key]!r}")
    if "base" not in raw:
        raise UserError(f"{path}: missing 'base' (the recipe every point starts from, relative to this file)")
    name = raw.get("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names directories)")
    base_path = path.parent / raw["base"]
    base = resolve_paths(read_toml(base_path, missing=f"{path}: base recipe {base_path} not found"), base_path.parent)

    # Paths in the sweep file are relative to it, as a recipe's are to the recipe (config.resolve_paths).
    axes = {k: [_resolve_value(k, x, path.parent) for x in v] if isinstance(v, list) else v
            for k, v in _flatten(raw.get("axes", {}), f"{path} [axes]").items()}
    fixed = {k: _resolve_value(k, v, path.parent) for k, v in _flatten(raw.get("set", {}), f"{path} [set]").items()}
    if not axes:
        raise UserError(f"{path}: [axes] is empty; declare at least one, e.g. seed = [0, 1, 2]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: axis {key!r} must be a non-empty list of values, got {values!r}")
        if len({_fmt(v) for v in values}) < len(values):
            raise UserError(f"{path}: axis {key!r} repeats a value: {values!r}")
    for key in (*axes, *fixed):
        if key in RESERVED:
            raise UserError(f"{path}: {key!r} is set by the sweep (points are named {name}-..., in output_dir)")
    both = sorted(set(axes) & set(fixed))
    if both:
        raise UserError(f"{path}: {both[0]!r} is both an axis and in [set]")

    count = math.prod(len(v) for v in axes.values())  # before expanding: 10^8 points must not hang --plan
    if count > MAX_POINTS:
        raise UserError(f"{path}: [axes] make {count:,} points ({' x '.join(str(len(v)) for v in axes.values())}), "
                        f"more than a sweep runs ({MAX_POINTS:,}); split it into several sweeps")
    output_dir = Path(resolve_paths({"output_dir": raw["output_dir"]}, path.parent)["output_dir"]
                      if "output_dir" in raw else f"runs/{name}")
    labels = axis_labels(list(axes))
    points, names = [], {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        point_name = name + "-" + "-".join(_slug(f"{labels[k]}={_fmt(v)}") for k, v in values.items())
        if point_name in names:
            raise UserError(f"{path}: points {names[point_name]} and {values} get the same name {point_name!r}")
        names[point_name] = values
        tree = json.loads(json.dumps(base))  # a deep copy of plain TOML data
        for key, value in {**fixed, **values}.items():
            set_path(tree, key.split("."), value)
        tree["name"], tree["output_dir"] = point_name, str(output_dir)
        points.append(Point(point_name, values, validate(tree, f"{path} (point {point_name})")))
    sweep = Sweep(path, name, axes, fixed, output_dir, points)
    _check_finished_points_match(sweep)
    return sweep


def _check_finished_points_match(sweep: Sweep) -> None:
    """A point directory that already holds a run must hold THIS point's config (run() checks unfinished ones too,
    but a finished one would otherwise be skipped and reported with stale results)."""
    for p in sweep.points:
        saved = p.run_dir / "config.json"
        if saved.exists():
            config = _read_json(saved, p, lambda x: isinstance(x.get("config"), dict), "no 'config' object")
            changed = diff_keys(config["config"], p.cfg.model_dump(mode="json"))
            if changed:
                raise UserError(f"{sweep.path}: {p.run_dir} holds a run with a different config "
                                f"({', '.join(changed[:5])} differ); delete it or change the sweep's name")
        if p.done:
            _read_json(p.run_dir / "summary.json", p, _summary_ok, "'evals' is not an object")


def _summary_ok(summary: dict[str, Any]) -> bool:
    return isinstance(summary.get("evals") or {}, dict)


def _read_json(path: Path, point: Point, valid: Any, expected: str) -> dict[str, Any]:
    """A point's config.json or summary.json, or UserError naming the file: a damaged file stops the sweep
    before anything runs (skipping the point would drop it from results.csv without a trace)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(value, dict) and valid(value) else expected
    except (OSError, ValueError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem is not None:
        raise UserError(f"{path}: {problem}; the sweep's point {point.name} cannot use it: delete {point.run_dir} "
                        "to run the point again")
    return value


# --------------------------------------------------------------------------------------------------------------
# Running and the results table


def run_sweep(path: Path, *, only_plan: bool = False, console: Console | None = None) -> Path:
    """Run every unfinished point in order (sequentially, in-process); return the results CSV."""
    console = console or Console(stderr=True)
    sweep = load_sweep(path)
    _print_plan(sweep, console)
    if only_plan:
        return sweep.results_csv
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    write_results(sweep)
    failed: list[str] = []
    with StopOnSigterm() as stop:  # SIGTERM: the current point checkpoints and stops; no later point starts
        for i, p in enumerate(sweep.points, 1):
            if p.done:
                continue
            if stop.requested:
                raise RunStopped(f"sweep {sweep.name} stopped by {stop.requested} before point {p.name}; re-run "
                                 "the same command to resume")
            console.rule(f"sweep {sweep.name}: point {i}/{len(sweep.points)}: {p.name}")
            try:
                run(p.cfg, console=console, stop=stop)
            except RunStopped:
                write_results(sweep)
                raise
            except Exception as e:  # noqa: BLE001 - one failed point must not lose the others; raised below
                failed.append(f"{p.name}: {type(e).__name__}: {e}")
                console.print(f"[red]point {p.name} failed[/red]: {e}")
            write_results(sweep)
    finished = sum(p.done for p in sweep.points)
    console.print(f"sweep {sweep.name}: {finished}/{len(sweep.points)} points finished; {sweep.results_csv}")
    if finished == len(sweep.points) > 1:
        _analyse(sweep, console)
    if failed:
        raise UserError(f"{len(failed)} of {len(sweep.points)} sweep points failed (re-run to retry them):\n  "
                        + "\n  ".join(failed))
    return sweep.results_csv


def _analyse(sweep: Sweep, console: Console) -> None:
    """Once every point has finished: seed CIs (if seed is an axis) and the iso-compute table of eval/pass@1."""
    over = "seed" if "seed" in sweep.axes else None
    if over:
        aggregate(sweep.results_csv, over=over)
        console.print(f"mean and 95% CI over seeds: {sweep.output_dir / BY_POINT}")
    try:
        table = iso_compute(sweep.output_dir, over=over)
    except UserError as e:  # e.g. a metric the runs do not log; the sweep itself succeeded
        console.print(f"no iso-compute comparison: {e}")
        return
    view = Table(title="best eval/pass@1 at equal compute/flops")
    for column in ("compute/flops", "best", "eval/pass@1"):
        view.add_column(column)
    for row in table:
        view.add_row(f"{row['budget']:.3g}", row["best"], f"{row['best_value']:.3f}")
    console.print(view)
    console.print(f"{sweep.output_dir / (ISO + '.csv')}, {sweep.output_dir / (ISO + '.png')}")


def _print_plan(sweep: Sweep, console: Console) -> None:
    table = Table(title=f"sweep {sweep.name}: {len(sweep.points)} points in {sweep.output_dir}")
    table.add_column("point")
    labels = axis_labels(list(sweep.axes))
    for key in sweep.axes:
        table.add_column(labels[key])
    table.add_column("status")
    for p in sweep.points:
        status = "done" if p.done else "resume" if (p.run_dir / "config.json").exists() else "new"
        table.add_row(p.name, *(_fmt(v) for v in p.values.values()), status)
    console.print(table)


def result_row(point: Point) -> dict[str, Any] | None:
    """The results.csv row of a finished point, None if it has not finished."""
    if not point.done:
        return None
    summary = _read_json(point.run_dir / "summary.json", point, _summary_ok, "'evals' is not an object")
    evals = summary.get("evals") or {}
    final = evals.get(point.cfg.recipe[-1]) or (list(evals.values())[-1] if evals else {})
    rows = read_metrics(point.run_dir)
    last = rows[-1] if rows else {}
    row: dict[str, Any] = {"point": point.name, **{k: _fmt(v) for k, v in point.values.items()}, **final}
    row.update({k: v for k, v in last.items() if k.startswith("compute/")})
    row["time/elapsed_s"] = last.get("time/elapsed_s", summary.get("elapsed_s"))
    row["steps"] = summary.get("steps")
    row["precision"], row["cpu"] = summary.get("precision", "unknown"), summary.get("cpu", "unknown")
    return row


def write_results(sweep: Sweep) -> Path:
    """Rebuild results.csv from the finished run directories (idempotent; written atomically)."""
    rows = [r for r in map(result_row, sweep.points) if r is not None]
    return write_csv(sweep.results_csv, rows)


