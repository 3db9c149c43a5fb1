"""`posttrain report RUN_DIR [RUN_DIR ...]`: one self-contained report.html (inline CSS, no scripts, PNGs by
relative file name) next to its figures.

    posttrain report runs/quickstart                      # -> runs/quickstart/report.html
    posttrain report runs/grpo runs/dapo --out reports/   # runs overlaid, legend = run directory name
"""

from __future__ import annotations

import html
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import posttrain
from posttrain.errors import UserError
from posttrain.outputs import check_output, write_atomic
from posttrain.report import figures
from posttrain.report.data import RunData, load_run, number, run_names
from posttrain.rundir import diff_keys

# (label, dotted config path, shown only when this stage is in the recipe)
KEY_SETTINGS: list[tuple[str, str, str | None]] = [
    ("recipe", "recipe", None),
    ("model", "model.path", None),
    ("environment", "env.name", None),
    ("environment args", "env.args", None),
    ("seed", "seed", None),
    ("SFT steps", "sft.steps", "sft"),
    ("SFT lr", "sft.lr", "sft"),
    ("SFT batch size", "sft.batch_size", "sft"),
    ("RL preset", "rl.preset", "rl"),
    ("RL steps", "rl.steps", "rl"),
    ("prompts per step", "rl.prompts_per_step", "rl"),
    ("group size", "rl.group_size", "rl"),
    ("advantage", "rl.advantage", "rl"),
    ("policy loss", "rl.policy_loss", "rl"),
    ("clip (low, high)", "rl.eps_low,rl.eps_high", "rl"),
    ("aggregation", "rl.aggregation", "rl"),
    ("KL (coef, estimator)", "rl.kl_coef,rl.kl_estimator", "rl"),
    ("group filter", "rl.group_filter", "rl"),
    ("RL lr", "rl.lr", "rl"),
    ("rollout temperature", "rl.temperature", "rl"),
    ("max new tokens", "rl.max_new_tokens", "rl"),
    ("eval problems x samples", "eval.problems,eval.samples", None),
    ("eval ks", "eval.ks", None),
    ("bf16 (asked)", "model.bf16", None),
    ("LoRA", "model.lora", None),
    ("engine", "rollout.engine", None),
    ("max staleness", "rollout.max_staleness", None),
    ("learner world size", "learner.world_size", None),
    ("threads", "threads", None),
]
# What each run measured about its machine (summary.json), shown under the settings: the numbers depend on them.
MACHINE_ROWS = [("precision (ran)", "precision"), ("CPU", "cpu"), ("peak memory (MB)", "peak_rss_mb")]
INTERMEDIATE_TAG = re.compile(r"-step\d+$")  # rl-step50: shown in the eval-over-steps figure, not the table

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.muted { color: #777; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff6dc; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; margin-right: 0.4em;
          vertical-align: -0.1em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { max-width: 60em; margin-top: 0.4em; } .note { color: #a15c00; }
"""


def write_report(run_dirs: list[Path], *, out_dir: Path | None = None) -> Path:
    """Write report.html and its PNG figures for one or more run directories; return the HTML path.

    out_dir defaults to the first run directory; a given out_dir that is a file (or lies under one) is an error.
    Several runs are overlaid in each figure (legend = directory name). Missing files or metrics leave out the
    figure or table that needs them; only a run directory that does not exist at all is an error. The files in
    out_dir are regenerated each time (report.html written whole, through report.html.tmp).
    """
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    paths = [Path(d) for d in run_dirs]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"report: {p} is not a directory")
    out_dir = check_output(Path(out_dir), directory=True) if out_dir is not None else paths[0]
    runs = [load_run(p, name) for p, name in zip(paths, run_names(paths), strict=True)]
    out_dir.mkdir(parents=True, exist_ok=True)

    rcolors, tcolors = figures.run_colors(runs), figures.tag_colors(runs)
    plots = [
        figures.training_curves(runs, rcolors, out_dir),
        figures.training_curves(runs, rcolors, out_dir, x="compute/rl_flops"),
        figures.sft_loss(runs, rcolors, out_dir),
        *(figures.stage_curves(runs, rcolors, out_dir, stage) for stage in figures.STAGE_PANELS),
        figures.eval_over_steps(runs, rcolors, out_dir),
    ]
    passk_plot, verdicts = figures.passk_vs_k(runs, tcolors, out_dir)
    plots += [passk_plot, figures.by_difficulty(runs, tcolors, out_dir)]

    page = render_html(runs, [p for p in plots if p is not None], rcolors, verdicts=verdicts, out_dir=out_dir)
    path = out_dir / "report.html"
    write_atomic(path, page)
    return path


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt_setting(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " → ".join(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": ")) if value else "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting(run: RunData, paths: str) -> str:
    """A key setting's display value; 'a,b' joins several config paths ('0.2, 0.28')."""
    values = [_get(run.config, p) for p in paths.split(",")]
    if all(v is None for v in values):
        return "—"
    return ", ".join(_fmt_setting(v) for v in values)


def _fmt_num(value: Any) -> str:
    v = number(value)
    return "—" if v is None else f"{v:.3f}"


def _swatch(color) -> str:
    r, g, b = (round(255 * c) for c in color[:3])
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _runs_table(runs: list[RunData], rcolors: dict, out_dir: Path) -> str:
    rows = []
    for run in runs:
        steps = [number(r.get("step")) for r in run.rows]
        last = max((s for s in steps if s is not None), default=None)
        if run.summary is not None:
            status = f"finished {_e(run.summary.get('finished_at', ''))}"
            elapsed = number(run.summary.get("elapsed_s"))
        else:
            status = "unfinished (no summary.json)" if run.rows else "no metrics"
            elapsed = max((number(r.get("time/elapsed_s")) or 0.0 for r in run.rows), default=None)
        where = _relative(run.path, out_dir)
        notes = "".join(f'<div class="note">{_e(n)}</div>' for n in run.notes)
        rows.append(
            f"<tr><td>{_swatch(rcolors[run.name])}<b>{_e(run.name)}</b>{notes}</td><td><code>{_e(where)}</code></td>"
            f"<td>{status}</td><td class='num'>{'—' if last is None else int(last)}</td>"
            f"<td class='num'>{'—' if elapsed is None else f'{elapsed / 60:.1f} min'}</td>"
            f"<td>{_e(run.meta.get('code', '—'))}</td></tr>")
    return ("<table><tr><th>run</th><th>directory</th><th>status</th><th>last step</th><th>wall time</th>"
            "<th>code</th></tr>" + "".join(rows) + "</table>")


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(out_dir.resolve())) or "."
    except ValueError:
        return str(path)


def _config_table(runs: list[RunData]) -> str:
    if not any(r.config for r in runs):
        return "<p class='muted'>No config.json found.</p>"
    stages = {s for r in runs for s in (r.config.get("recipe") or [])}
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
    rows = []
    for label, paths, stage in KEY_SETTINGS:
        if stage is not None and stages and stage not in stages:
            continue
        values = [setting(r, paths) for r in runs]
        if all(v == "—" for v in values):
            continue
        differs = len(runs) > 1 and len(set(values)) > 1
        cells = "".join(f"<td>{_e(v)}</td>" for v in values)
        rows.append(f"<tr{' class=differs' if differs else ''}><th>{_e(label)}</th>{cells}</tr>")
    shown = {p for _, paths, _ in KEY_SETTINGS for p in paths.split(",")}
    for key in _other_differences(runs, shown):  # every other setting that separates the runs
        values = [_fmt_setting(_get(r.config, key)) for r in runs]
        rows.append(f"<tr class=differs><th><code>{_e(key)}</code></th>{''.join(f'<td>{_e(v)}</td>' for v in values)}</tr>")
    for label, key in MACHINE_ROWS:
        values = [_fmt_setting((r.summary or {}).get(key)) for r in runs]
        if any(v != "—" for v in values):
            differs = len(runs) > 1 and len(set(values)) > 1
            rows.append(f"<tr{' class=differs' if differs else ''}><th>{_e(label)}</th>"
                        + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    step_times = [_median_step_s(r) for r in runs]
    if any(t is not None for t in step_times):
        rows.append("<tr><th>median s / step</th>" + "".join(
            f"<td>{'—' if t is None else f'{t:.2f}'}</td>" for t in step_times) + "</tr>")
    note = "<p class='muted'>Highlighted rows differ between runs.</p>" if len(runs) > 1 else ""
    return f"<table><tr><th>setting</th>{head}</tr>{''.join(rows)}</table>{note}"


def _other_differences(runs: list[RunData], shown: set[str]) -> list[str]:
    """Dotted config keys, beyond the key settings, whose values differ between any two runs (output paths and
    names aside: every run has its own)."""
    if len(runs) < 2:
        return []
    keys: set[str] = set()
    for other in runs[1:]:
        keys |= set(diff_keys(runs[0].config, other.config))
    return sorted(k for k in keys if k not in shown and k not in ("name", "output_dir"))


def _median_step_s(run: RunData) -> float | None:
    """The median wall time between consecutive training rows (a row per step), or None."""
    times = [number(r.get("time/elapsed_s")) for r in run.rows if "train/lr" in r]
    gaps = sorted(b - a for a, b in itertools.pairwise(times) if a is not None and b is not None and b > a)
    return gaps[len(gaps) // 2] if gaps else None


def _samples_section(runs: list[RunData], per_run: int = 3) -> str:
    """A few completions from each run's last logged RL step (samples.jsonl), to read what the policy does."""
    blocks = []
    for run in runs:
        path = run.path / "samples.jsonl"
        if not path.is_file():
            continue
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        if not rows:
            continue
        last = max(number(r.get("step")) or 0 for r in rows)
        shown = [r for r in rows if (number(r.get("step")) or 0) == last][:per_run]
        items = "".join(f"<li>reward {_fmt_num(r.get('reward'))}: <code>{_e(str(r.get('completion', ''))[:300])}"
                        "</code></li>" for r in shown)
        blocks.append(f"<p><b>{_e(run.name)}</b>, step {int(last)}:</p><ul>{items}</ul>")
    return "".join(blocks) or "<p class='muted'>No samples.jsonl (only RL stages log samples).</p>"


def _eval_rows(run: RunData) -> tuple[list[dict[str, Any]], str]:
    """Final eval numbers of a run: from eval/*.json (with CIs), else summary.json, else the last eval rows of
    metrics.jsonl. Returns rows {"tag", "step", metric: (mean, lo, hi)} and where they came from."""
    if run.evals:
        out = []
        for result in run.evals:
            tag = str(result.get("tag"))
            if INTERMEDIATE_TAG.search(tag):
                continue
            row: dict[str, Any] = {"tag": tag, "step": number(result.get("step"))}
            if number(result.get("greedy_acc")) is not None:
                row["greedy_acc"] = (number(result["greedy_acc"]), None, None)
            for k, v in result.items():
                if isinstance(v, dict) and number(v.get("mean")) is not None:
                    row[k] = (number(v["mean"]), number(v.get("ci_low")), number(v.get("ci_high")))
            for label, suite in (result.get("suites") or {}).items():  # transfer suites: their own columns
                if not isinstance(suite, dict):
                    continue
                if number(suite.get("greedy_acc")) is not None:
                    row[f"{label}/greedy_acc"] = (number(suite["greedy_acc"]), None, None)
                for k, v in suite.items():
                    if k != "mean@n" and isinstance(v, dict) and number(v.get("mean")) is not None:
                        row[f"{label}/{k}"] = (number(v["mean"]), number(v.get("ci_low")), number(v.get("ci_high")))
            out.append(row)
        return out, "eval/*.json"
    evals = (run.summary or {}).get("evals")
    if isinstance(evals, dict) and evals:
        return [{"tag": tag, "step": None, **{k.removeprefix("eval/"): (number(v), None, None)
                                              for k, v in (m or {}).items() if number(v) is not None}}
                for tag, m in evals.items() if not INTERMEDIATE_TAG.search(tag)], "summary.json"
    last: dict[str, dict[str, Any]] = {}
    for r in run.rows:
        vals = {k.removeprefix("eval/"): (number(v), None, None) for k, v in r.items()
                if k.startswith("eval/") and number(v) is not None}
        if vals:
            last[str(r.get("stage"))] = {"tag": f"{r.get('stage')} (last)", "step": number(r.get("step")), **vals}
    return list(last.values()), "metrics.jsonl"


def _eval_table(runs: list[RunData]) -> str:
    per_run = [(r, *_eval_rows(r)) for r in runs]
    if not any(rows for _, rows, _ in per_run):
        return "<p class='muted'>No evaluation results found (no eval/*.json, no eval rows in metrics.jsonl).</p>"
    metrics: list[str] = []
    for _, rows, _ in per_run:
        for row in rows:
            metrics += [k for k in row if k not in ("tag", "step") and k not in metrics]
    if "pass@1" in metrics and "mean@n" in metrics:
        metrics.remove("mean@n")  # mean@n = c / n is the unbiased pass@1: the same number twice
    metrics.sort(key=lambda m: (m != "greedy_acc", _metric_key(m)))
    head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
    body = []
    for run, rows, source in per_run:
        for row in rows:
            cells = []
            for m in metrics:
                mean, lo, hi = row.get(m, (None, None, None))
                ci = f" <span class='muted'>[{lo:.3f}, {hi:.3f}]</span>" if lo is not None and hi is not None else ""
                cells.append(f"<td class='num'>{_fmt_num(mean)}{ci}</td>")
            step = row.get("step")
            body.append(f"<tr><td>{_e(run.name)}</td><td>{_e(row['tag'])}</td>"
                        f"<td class='num'>{'—' if step is None else int(step)}</td>{''.join(cells)}</tr>")
        if rows and source != "eval/*.json":
            body.append(f"<tr><td colspan='{3 + len(metrics)}' class='muted'>{_e(run.name)}: numbers from "
                        f"{_e(source)} (no eval/*.json)</td></tr>")
    return (f"<table><tr><th>run</th><th>eval</th><th>step</th>{head}</tr>{''.join(body)}</table>"
            "<p class='muted'>Held-out problems; brackets are 95% bootstrap CIs over problems. pass@k is the "
            "unbiased estimator from n samples per problem (pass@1 = mean@n); maj@n is majority-vote accuracy; "
            "greedy_acc is one greedy answer per problem.</p>")


def _adhoc_table(runs: list[RunData]) -> str:
    """`posttrain eval` results kept in a run (eval/adhoc/): listed with their own protocol, never mixed into the
    run's evaluations (they are often the same final model at another n, which must not read as another model)."""
    rows = []
    for run in runs:
        for r in run.adhoc:
            p = r.get("protocol") or {}
            metrics = ", ".join(f"{k} {v['mean']:.3f}" for k, v in r.items()
                                if isinstance(v, dict) and number(v.get("mean")) is not None and k != "mean@n")
            rows.append(f"<tr><td>{_e(run.name)}</td><td>{_e(r.get('file'))}</td><td>{_e(r.get('checkpoint'))}</td>"
                        f"<td>{_e(r.get('env'))} / {_e(r.get('split'))}</td><td>{_e(r.get('problems'))} x "
                        f"{_e(r.get('samples'))}</td><td>{_e(p.get('max_new_tokens', ''))}</td>"
                        f"<td>greedy {number(r.get('greedy_acc')) or 0:.3f}, {_e(metrics)}</td></tr>")
    if not rows:
        return ""
    return ("<h3>Ad-hoc evaluations (posttrain eval)</h3><table><tr><th>run</th><th>file</th><th>model</th>"
            "<th>env / split</th><th>problems x n</th><th>max tokens</th><th>results</th></tr>" + "".join(rows)
            + "</table><p class='muted'>Evaluated after the run with `posttrain eval`, each with its own protocol "
            "(often more samples per problem); not part of the run's own evaluations above or of the figures.</p>")


def _metric_key(name: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"pass@(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def render_html(runs: list[RunData], plots: list[figures.Plot], rcolors: dict, *, verdicts: list[str],
                out_dir: Path) -> str:
    names = ", ".join(r.name for r in runs)
    env = sorted({str(_get(r.config, "env.name")) for r in runs if _get(r.config, "env.name")})
    subtitle = (f"{len(runs)} run{'s' if len(runs) > 1 else ''}" + (f" on {', '.join(env)}" if env else "")
                + f" · generated {time.strftime('%Y-%m-%d %H:%M')} by posttrain {posttrain.__version__}")
    figs = []
    for plot in plots:
        extra = ""
        if plot.file == "report_passk.png" and verdicts:
            extra = "<br><b>Here:</b> " + " ".join(_e(v) for v in verdicts)
        figs.append(f'<figure><img src="{_e(plot.file)}" alt="{_e(plot.title)}">'
                    f"<figcaption><b>{_e(plot.title)}.</b> {_e(plot.caption)}{extra}</figcaption></figure>")
    if not figs:
        figs.append("<p class='muted'>Nothing to plot: the run directories hold no metrics or evaluations yet.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>posttrain report: {_e(names)}</title><style>{CSS}</style></head>
<body>
<h1>posttrain report: {_e(names)}</h1>
<p class="muted">{_e(subtitle)}</p>
<h2>Runs</h2>
{_runs_table(runs, rcolors, out_dir)}
<h2>Key settings</h2>
{_config_table(runs)}
<h2>Sample completions</h2>
{_samples_section(runs)}
<h2>Evaluation</h2>
{_eval_table(runs)}
{_adhoc_table(runs)}
<h2>Figures</h2>
{''.join(figs)}
</body></html>
"""
