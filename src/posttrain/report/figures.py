"""The report's figures, one PNG each. Every function takes the loaded runs and returns a `Plot` (file name, title,
caption) or None when no run has the data. Matplotlib is used through `Figure` + `FigureCanvasAgg` only, never
pyplot, so nothing touches global state or needs a display.

Colours: a run keeps its colour in every figure (`run_colors`); an eval tag keeps its colour in every figure
(`tag_colors`: grey for the starting model, then a dark-to-bright ramp in step order, so "later" reads "brighter").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    LogFormatterSciNotation,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

from posttrain.report.data import (
    STAGE_ORDER,
    STAGE_STEP,
    RunData,
    difficulty_table,
    eval_metric_names,
    eval_points,
    number,
    passk_band,
    passk_curve,
    series,
    stage_boundaries,
    stage_starts,
)

DPI = 120
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
        "xtick.labelsize": 9, "ytick.labelsize": 9}
SMOOTH_MIN_POINTS = 40  # longer curves get a moving-average line over the faint raw points
BASE_COLOR = "#6e6e6e"


@dataclass(frozen=True)
class Plot:
    file: str  # PNG file name, relative to the report directory
    title: str
    caption: str  # what to look for


# (metric key, panel title, y label)
TRAINING_PANELS = [
    ("rollout/reward_mean", "Reward (mean over rollouts)", "reward"),
    ("rollout/pass_rate", "Rollout pass rate", "fraction correct"),
    ("pg/entropy", "Policy entropy", "nats / token"),
    ("rollout/len_mean", "Response length", "tokens"),
    ("pg/clip_frac", "Clipped fraction (PPO ratio)", "fraction of tokens"),
    ("kl/value", "KL to reference", "nats / token"),
    ("is/mismatch_kl", "Engine vs learner logprobs (k3 KL)", "nats / token"),
    ("episode/turns_mean", "Turns per episode (multi-turn)", "turns"),
    ("episode/tool_calls_mean", "Tool calls per episode", "calls"),
    ("episode/tool_errors_mean", "Tool errors per episode", "errors"),
    ("episode/env_tokens_mean", "Environment tokens per episode (not trained)", "tokens"),
    ("episode/reward_per_turn", "Reward per turn", "reward"),
]


# ---------------------------------------------------------------------------------------------------------------
# colours and small helpers


def run_colors(runs: list[RunData]) -> dict[str, tuple]:
    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run.name: cmap(i % cmap.N) for i, run in enumerate(runs)}


def tag_order(runs: list[RunData]) -> list[str]:
    """Every eval tag of every run in training order: by stage (base < sft < rl), within a stage the periodic
    evaluations (rl-step50, ...) by step and the stage's closing evaluation (tag == stage) last. Runs of
    different lengths thus agree on the order even though their steps differ."""
    keys: dict[str, tuple[int, int, float]] = {}
    for run in runs:
        for result in run.evals:
            tag, stage = str(result.get("tag")), str(result.get("stage"))
            step = number(result.get("step"))
            key = (STAGE_ORDER.get(stage, 3), int(tag == stage), step if step is not None else math.inf)
            keys[tag] = min(keys.get(tag, key), key)
    return sorted(keys, key=lambda t: (keys[t], t))


def tag_colors(runs: list[RunData]) -> dict[str, tuple | str]:
    tags = tag_order(runs)
    others = [t for t in tags if t != "base"]
    ramp = colormaps["plasma"]
    out: dict[str, tuple | str] = {"base": BASE_COLOR} if "base" in tags else {}
    for i, tag in enumerate(others):  # dark blue (early) -> orange (late)
        out[tag] = ramp(0.05 + 0.75 * i / (len(others) - 1) if len(others) > 1 else 0.05)
    return out


def _new_figure(n_panels: int, *, ncols: int = 3, w: float = 4.4, h: float = 3.3) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax in axes[:n_panels]:
        ax.grid(True, alpha=0.3)
    return fig, axes[:n_panels]


def _save(fig: Figure, out_dir: Path, file: str) -> None:
    fig.savefig(out_dir / file, dpi=DPI, facecolor="white")


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (the window shrinks at the ends), so the smoothed curve does not lag the raw one."""
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def _plot_curve(ax, x: np.ndarray, y: np.ndarray, color, label: str | None) -> None:
    if len(x) >= SMOOTH_MIN_POINTS:
        ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
        ax.plot(x, smooth(y, max(5, len(x) // 15)), color=color, lw=1.8, label=label)
    else:
        ax.plot(x, y, color=color, lw=1.6, marker="o" if len(x) < 12 else None, ms=3, label=label)


def _mark_stages(ax, run: RunData, color, *, x: str = "step", label_text: bool = True) -> None:
    for xv, stage in stage_boundaries(run.rows, x=x):
        ax.axvline(xv, color=color, ls="--", lw=1.0, alpha=0.7)
        if label_text:
            ax.text(xv, 0.98, f" {stage}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                    fontsize=8, color=color)


def _run_legend(fig: Figure, runs: list[RunData], colors: dict, *, stages: bool) -> None:
    handles = [Line2D([], [], color=colors[r.name], lw=2, label=r.name) for r in runs]
    if stages:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label="stage change"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), frameon=False)


def _log_axis(ax) -> None:
    """Log x axis whose labels stay readable: over less than two decades label 2x and 5x between the powers of
    ten (otherwise there may be a single label), never all eight minor ticks (they collide)."""
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if lo > 0 and math.log10(hi / lo) < 2:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 2)))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _log2_ticks(ax, k_max: int) -> None:
    ticks = [2**i for i in range(int(math.log2(k_max)) + 1)]
    if ticks[-1] != k_max:
        ticks.append(k_max)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.xaxis.set_major_formatter(fmt)


# ---------------------------------------------------------------------------------------------------------------
# figures


def panel_choice(runs: list[RunData], x: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The RL health panels worth drawing, and a sentence for each one left out: a panel identical to another
    (with a binary reward the mean reward IS the pass rate) or zero at every step in every run."""
    drawn, notes = [], []
    for key, title, ylabel in TRAINING_PANELS:
        curves = [series(r.rows, key, x=x, stages=("rl",)) for r in runs]
        if not any(xs.size for xs, _ in curves):
            continue
        if key == "rollout/pass_rate" and all(
                np.array_equal(series(r.rows, "rollout/reward_mean", x=x, stages=("rl",))[1], ys)
                for r, (_, ys) in zip(runs, curves, strict=True)):
            notes.append("The rollout pass rate is not drawn: it equals the mean reward at every step (a 0/1 "
                         "reward), so the reward panel shows both.")
            continue
        if all(not np.any(ys) for _, ys in curves):
            why = {"pg/clip_frac": " (updates are on-policy: one epoch, one mini-batch, so the ratio is 1)",
                   "kl/value": " (no KL term: kl_coef = 0, so there is no reference model)"}.get(key, "")
            notes.append(f"{title} is not drawn: it is zero at every step{why}.")
            continue
        drawn.append((key, title, ylabel))
    return drawn, notes


def training_curves(runs: list[RunData], colors: dict, out_dir: Path, *, x: str = STAGE_STEP) -> Plot | None:
    """The RL health panels against the RL stage's own step (runs whose SFT stopped at different steps overlap)
    or against the RL stage's own compute (compute/rl_flops)."""
    panels, notes = panel_choice(runs, x)
    if not panels:
        return None
    over_compute = x != STAGE_STEP
    with rc_context(FONT):
        fig, axes = _new_figure(len(panels))
        all_x = np.concatenate([series(r.rows, p[0], x=x, stages=("rl",))[0] for r in runs for p in panels])
        for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
            for run in runs:
                xs, ys = series(run.rows, key, x=x, stages=("rl",))
                if xs.size:
                    _plot_curve(ax, xs, ys, colors[run.name], run.name)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            if over_compute:
                ax.set_xlabel("RL compute (FLOPs since RL started)")
                _compute_axis(ax, all_x)
            else:
                ax.set_xlabel("RL step")
        _run_legend(fig, runs, colors, stages=False)
        file = "report_training_compute.png" if over_compute else "report_training_steps.png"
        _save(fig, out_dir, file)
    left_out = (" " + " ".join(notes)) if notes else ""
    if over_compute:
        return Plot(file, "RL curves over compute",
                    "The same panels against the FLOPs spent in the RL stage (generation + logprob passes + "
                    "training), counted from the stage's start so that runs with different SFT lengths start at "
                    "zero together. This is the fair axis for comparing runs whose steps cost different amounts "
                    "(group size, prompts per step, model size): the better recipe is the curve that is higher "
                    "further left." + left_out)
    return Plot(file, "RL curves over RL steps",
                "Steps are counted from the start of the RL stage, so runs whose SFT stopped at different steps "
                "(sft.stop_at_accuracy) overlap. Reward should rise; entropy falling to near zero means the "
                "policy has collapsed onto few answers (exploration is gone); response length shows drift "
                "towards longer or truncated answers; a clipped fraction that keeps growing means updates are "
                "too large for the trust region; KL measures how far the policy moved from the reference. "
                "Long curves are shown smoothed (centred moving average) over the faint raw values." + left_out)


def _compute_axis(ax, xs: np.ndarray) -> None:
    """Log scale over two or more decades, else linear with one shared power of ten (no colliding labels)."""
    pos = xs[xs > 0]
    if pos.size and pos.max() / pos.min() >= 100:
        _log_axis(ax)
    else:
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-3, 3))
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_major_locator(MaxNLocator(5))


def sft_loss(runs: list[RunData], colors: dict, out_dir: Path) -> Plot | None:
    # sft/loss; runs written before the metric had its own name logged it as train/loss
    data = [(r, *(series(r.rows, "sft/loss", stages=("sft",)) if any("sft/loss" in row for row in r.rows)
                  else series(r.rows, "train/loss", stages=("sft",)))) for r in runs]
    data = [(r, xs, ys) for r, xs, ys in data if xs.size]
    if not data:
        return None
    with rc_context(FONT):
        fig, (ax,) = _new_figure(1, w=6.5, h=3.8)
        for run, xs, ys in data:
            _plot_curve(ax, xs, ys, colors[run.name], run.name)
        all_y = np.concatenate([ys for _, _, ys in data])
        if all_y.min() > 0 and all_y.max() / all_y.min() > 20:
            ax.set_yscale("log")
        ax.set_title("SFT loss")
        ax.set_xlabel("step (optimizer steps)")
        ax.set_ylabel("cross-entropy (nats / completion token)")
        if len(data) > 1:
            ax.legend()
        _save(fig, out_dir, "report_sft_loss.png")
    return Plot("report_sft_loss.png", "SFT loss",
                "Token-level cross-entropy on the completions. It should fall quickly and flatten; a loss still "
                "falling at the end means more SFT steps would help, a loss near zero on a small synthetic set "
                "can mean memorisation (check the held-out accuracy below).")


# The panels of the stages that are not RL: (metric key, panel title, y label), and the figure's caption.
STAGE_PANELS: dict[str, tuple[list[tuple[str, str, str]], str]] = {
    "pretrain": ([("pretrain/loss", "Pretraining loss", "nats / token"),
                  ("pretrain/eval_loss", "Held-out loss", "nats / token")],
                 ("Next-token cross-entropy on the packed training sequences and on held-out ones. Both should "
                 "fall together; a training loss that keeps falling while the held-out one rises is overfitting "
                 "a corpus too small for the token budget.")),
    "rlp": ([("rlp/info_gain", "Information gain (reward)", "nats / target token"),
             ("rlp/drift_gain", "Drift gain (no thought)", "nats / target token"),
             ("rlp/thought_len", "Thought length", "tokens"),
             ("rlp/ema_lag", "EMA lag", "||θ − φ|| / ||θ||"),
             ("rlp/eval_loss", "Held-out loss", "nats / token")],
            ("RLP's reward is how much a thought raises log p(next tokens) over the EMA baseline without one. The "
            "drift gain is the same difference with no thought: the part of the reward that comes from the policy "
            "having moved ahead of its EMA, not from thinking; an information gain no larger than the drift gain "
            "means the thoughts carry nothing. The held-out loss (no thoughts) shows what RLP costs or gives plain "
            "next-token prediction.")),
}


def stage_curves(runs: list[RunData], colors: dict, out_dir: Path, stage: str) -> Plot | None:
    """The panels of STAGE_PANELS[stage] against the stage's own step, for the runs that ran it."""
    specs, caption = STAGE_PANELS[stage]
    panels = [p for p in specs if any(series(r.rows, p[0], x=STAGE_STEP, stages=(stage,))[0].size for r in runs)]
    if not panels:
        return None
    with rc_context(FONT):
        fig, axes = _new_figure(len(panels))
        for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
            for run in runs:
                xs, ys = series(run.rows, key, x=STAGE_STEP, stages=(stage,))
                if xs.size:
                    _plot_curve(ax, xs, ys, colors[run.name], run.name)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xlabel(f"{stage} step")
        _run_legend(fig, runs, colors, stages=False)
        file = f"report_{stage}.png"
        _save(fig, out_dir, file)
    return Plot(file, f"The {stage} stage", caption)


def eval_over_steps(runs: list[RunData], colors: dict, out_dir: Path) -> Plot | None:
    metrics = [m for m in eval_metric_names(runs) if any(eval_points(r, m) for r in runs)]
    if not metrics:
        return None
    # Runs whose last stage starts at different global steps (seed-dependent SFT lengths) are aligned on that
    # stage's start: its step 0 is x = 0 for every run, and the earlier stages extend to the left.
    offsets = {r.name: max(stage_starts(r.rows).values(), default=0.0) for r in runs}
    align = len(runs) > 1 and len(set(offsets.values())) > 1
    with rc_context(FONT):
        fig, axes = _new_figure(len(metrics), ncols=3, w=4.2, h=3.2)
        for ax, metric in zip(axes, metrics, strict=True):
            all_x = []
            for run in runs:
                pts = eval_points(run, metric)
                if not pts:
                    continue
                color = colors[run.name]
                shift = offsets[run.name] if align else 0.0
                xs = np.array([p[0] for p in pts]) - shift
                ys = np.array([p[1] for p in pts])
                all_x.append(xs)
                base = _base_points(run, pts)  # the starting model: a marker, not joined across the unmeasured gap
                ax.plot(xs[~base], ys[~base], color=color, lw=1.5, marker="o", ms=4, label=run.name)
                ax.plot(xs[base], ys[base], color=color, lw=0, marker="s", ms=4)
                ci = [(p[0] - shift, p[1], p[2], p[3]) for p in pts if p[2] is not None and p[3] is not None]
                if ci:
                    cx, cy, lo, hi = (np.array(v) for v in zip(*ci, strict=True))
                    ax.errorbar(cx, cy, yerr=[np.maximum(cy - lo, 0), np.maximum(hi - cy, 0)], fmt="none",
                                ecolor=color, elinewidth=1, capsize=3, alpha=0.8)
                if not align:
                    _mark_stages(ax, run, color, label_text=len(runs) == 1)
            if align:
                ax.axvline(0, color="0.3", ls="--", lw=1.0)
            xs = np.concatenate(all_x)
            if xs.max() == xs.min():  # a single step: give it a readable axis instead of +-0.04
                ax.set_xlim(xs.min() - 1, xs.max() + 1)
            ax.set_title(f"held-out {metric}")
            ax.set_xlabel("step, 0 = start of the last stage" if align else "step (optimizer steps)")
            ax.set_ylabel("fraction of problems")
        _run_legend(fig, runs, colors, stages=True)
        _save(fig, out_dir, "report_eval_steps.png")
    aligned = (" The runs are aligned on the start of their last stage (x = 0, dashed), because their earlier "
               "stages took different numbers of steps." if align else "")
    return Plot("report_eval_steps.png", "Held-out evaluation over steps",
                "Accuracy on problems never trained on, at each evaluation (error bars: 95% bootstrap CI over "
                "problems; a square marks the starting model, not joined to the next point since nothing was "
                "measured in between). greedy_acc and pass@1 should rise through SFT and RL. Watch pass@k at "
                "the largest k: if it stays flat or falls while pass@1 rises, RL is concentrating probability "
                "on answers the model could already find rather than teaching new ones. maj@n is majority-vote "
                "accuracy (mean@n, the average sample accuracy, is pass@1 by definition and not drawn)." + aligned)


def _base_points(run: RunData, pts: list[tuple]) -> np.ndarray:
    base_steps = {number(r.get("step")) for r in run.evals if r.get("stage") == "base"}
    base_steps |= {number(r.get("step")) for r in run.rows if r.get("stage") == "base"}
    first_training = min((number(r.get("step")) for r in run.rows if r.get("stage") not in (None, "base")
                          and number(r.get("step")) is not None), default=math.inf)
    return np.array([p[0] in base_steps and p[0] < first_training for p in pts], dtype=bool)


def passk_vs_k(runs: list[RunData], tcolors: dict, out_dir: Path) -> tuple[Plot | None, list[str]]:
    """Figure 4: pass@k for every k in 1..n, one panel per run, one curve per eval tag. Also returns sentences
    comparing the first and last tag of each run (crossing or not) for the caption."""
    panels = []
    for run in runs:
        curves = []
        for result in run.evals:
            ks, means = passk_curve(result.get("per_problem") or [])
            if ks.size < 2:
                continue
            if curves and np.array_equal(curves[-1][2], means) and np.array_equal(curves[-1][1], ks):
                continue  # the same model evaluated again (rl-step0 after sft): one curve, not two on top
            curves.append((result, ks, means, passk_band(result.get("per_problem") or [])))
        if curves:
            panels.append((run, curves))
    if not panels:
        return None, []
    verdicts = []
    top = max(float(np.max(c[2])) for _, curves in panels for c in curves)
    with rc_context(FONT):
        fig, axes = _new_figure(len(panels), ncols=min(3, len(panels)), w=5.0, h=3.8)
        for ax, (run, curves) in zip(axes, panels, strict=True):
            k_max = 1
            for result, ks, means, (bks, lo, hi) in curves:
                tag = str(result.get("tag"))
                color = tcolors.get(tag, "black")
                step = number(result.get("step"))
                label = tag if step is None else f"{tag} (step {int(step)})"
                ax.plot(ks, means, color=color, lw=1.8, marker="o", ms=3, label=label)
                if lo.size:
                    ax.fill_between(bks, lo, hi, color=color, alpha=0.15, lw=0)
                k_max = max(k_max, int(ks[-1]))
            ax.set_xscale("log", base=2)
            _log2_ticks(ax, k_max)
            ax.set_xlabel("k (samples per problem, log2 scale)")
            ax.set_ylabel("pass@k (fraction of problems)")
            ax.set_title(run.name if len(runs) > 1 else "pass@k vs k")
            ax.set_ylim(0, min(1.0, top * 1.08) if top > 0 else 1.0)  # one y scale for every run's panel
            ax.legend(loc="best", fontsize=8)
            ref, last = _reference_curve(curves), curves[-1]
            verdict = crossing_verdict(*ref[:3], *last[:3], noise=max(_half_width(ref), _half_width(last)))
            if verdict:
                verdicts.append(f"{run.name}: {verdict}" if len(runs) > 1 else verdict)
        _save(fig, out_dir, "report_passk.png")
    caption = ("Does RL expand the reasoning boundary? Unbiased pass@k (Chen et al. 2021) for every k from 1 to "
               "the number of samples n, averaged over held-out problems; bands are 95% bootstrap CIs over "
               "problems. pass@1 measures what the model usually does, pass@n what it can do at all. If the RL "
               "curve starts above the earlier one but they cross at large k, RL sharpened the distribution "
               "(fewer distinct solvable problems) rather than widened it; a curve above at every k is "
               "genuine expansion.")
    return Plot("report_passk.png", "pass@k vs k", caption), verdicts


def _half_width(curve: tuple) -> float:
    """Half the 95% CI width at the curve's largest k (0 when there is no band)."""
    _, lo, hi = curve[3]
    return float(hi[-1] - lo[-1]) / 2 if lo.size else 0.0


def _reference_curve(curves: list[tuple]) -> tuple:
    """What the last evaluation is compared with: the latest one from an earlier stage (RL is judged against
    the model it started from, usually 'sft'), else the first one."""
    last_stage = curves[-1][0].get("stage")
    earlier = [c for c in curves if c[0].get("stage") != last_stage]
    return earlier[-1] if earlier else curves[0]


def crossing_verdict(first: dict, ks0: np.ndarray, m0: np.ndarray, last: dict, ks1: np.ndarray,
                     m1: np.ndarray, *, noise: float = 0.0) -> str:
    """One sentence comparing the `last` eval's pass@k curve with the `first`'s over their common k.
    `noise`: a CI half-width; a pass@n gap smaller than it is called out as within the noise."""
    k = min(len(ks0), len(ks1))
    if first is last or k < 1:
        return ""
    a, b, kn = str(first.get("tag")), str(last.get("tag")), int(ks0[k - 1])
    diff = m1[:k] - m0[:k]
    tail = f"pass@{kn}: {m1[k - 1]:.3f} vs {m0[k - 1]:.3f}"
    noisy = 0 < abs(diff[-1]) <= noise
    if noisy:
        tail += f", a gap within the 95% CI of ±{noise:.3f}"
    eps = 1e-9
    behind = np.flatnonzero(diff < -eps)
    if diff[0] > eps and behind.size:
        where = (f"from k = {int(ks0[behind[0]])}" if np.all(diff[behind[0]:] < -eps)
                 else f"at k = {_ranges([int(ks0[i]) for i in behind])}")
        verdict = "possibly sharpened rather than widened" if noisy else "sharpened, not widened"
        return f"'{b}' beats '{a}' at pass@1 ({m1[0]:.3f} vs {m0[0]:.3f}) but falls behind {where} ({tail}): {verdict}."
    if diff[0] > eps and abs(diff[-1]) <= eps:
        return (f"'{b}' beats '{a}' at pass@1 ({m1[0]:.3f} vs {m0[0]:.3f}) and ties at large k ({tail}): "
                "more reliable on problems it could already solve, no new ones.")
    if not behind.size and diff[-1] > eps:
        verdict = "no clear change at large k" if noisy else "the set of solvable problems grew"
        return f"'{b}' is at or above '{a}' at every k ({tail}): {verdict}."
    return f"'{b}' vs '{a}': pass@1 {m1[0]:.3f} vs {m0[0]:.3f}, {tail}."


def _ranges(ks: list[int]) -> str:
    """[2, 3, 4, 7, 9, 10] -> '2-4, 7, 9-10'."""
    parts: list[list[int]] = []
    for k in ks:
        if parts and k == parts[-1][-1] + 1:
            parts[-1].append(k)
        else:
            parts.append([k])
    return ", ".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


def by_difficulty(runs: list[RunData], tcolors: dict, out_dir: Path) -> Plot | None:
    panels = []
    for run in runs:
        tables = [(r, difficulty_table(r)) for r in run.evals]
        tables = [(r, t) for r, t in tables if len(t) > 1]
        if tables:
            panels.append((run, tables))
    if not panels:
        return None
    with rc_context(FONT):
        fig, axes = _new_figure(len(panels), ncols=min(2, len(panels)), w=6.0, h=3.6)
        for ax, (run, tables) in zip(axes, panels, strict=True):
            levels: list[str] = []
            counts: dict[str, int | None] = {}
            for _, table in tables:
                for level, _, count in table:
                    if level not in levels:
                        levels.append(level)
                    counts.setdefault(level, count)
            width = 0.8 / len(tables)
            for j, (result, table) in enumerate(tables):
                values = {level: v for level, v, _ in table}
                xs = [i + (j - (len(tables) - 1) / 2) * width for i, level in enumerate(levels) if level in values]
                ys = [values[level] for level in levels if level in values]
                tag = str(result.get("tag"))
                ax.bar(xs, ys, width=width * 0.95, color=tcolors.get(tag, "black"), label=tag)
            ax.set_xticks(range(len(levels)),
                          [lv if counts.get(lv) is None else f"{lv}\n({counts[lv]})" for lv in levels])
            ax.set_xlabel("difficulty (number of problems)")
            ax.set_ylabel("pass@1 (fraction correct)")
            ax.set_ylim(0, 1.05)
            ax.grid(True, axis="y", alpha=0.3)
            ax.grid(False, axis="x")
            ax.set_title(run.name if len(runs) > 1 else "Accuracy by difficulty")
            ax.legend(loc="upper right", ncols=min(4, len(tables)))
        _save(fig, out_dir, "report_difficulty.png")
    return Plot("report_difficulty.png", "Accuracy by difficulty",
                "pass@1 on held-out problems per difficulty level, one bar per evaluation. Training usually "
                "lifts the easy levels first; gains that stop at some level show where the model's frontier "
                "is, and a curriculum or harder prompts would target the level just above it.")
