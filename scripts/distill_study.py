"""The distillation study (docs/studies/distillation.md): run it, then tabulate and plot what it measured.

    python scripts/distill_study.py            # run whatever is missing (teacher, student, data, 6 methods x 3 seeds)
    python scripts/distill_study.py --report   # only tabulate the finished runs

Runs go one after another (never two at once on a 2-core machine), each `posttrain run recipes/distill/M.toml --set
seed=S --set name=distill-M-seedS`; a finished run is reused. The x-axis of every curve is all the work the method
did after the shared student checkpoint, from the compute ledger: `compute/flops` of its run (generation, teacher
and reference passes, training), plus, for SFT on teacher samples, the FLOPs the teacher spent generating the data
(distill-data's .meta.json), and for offline OPD the FLOPs of sampling its fixed student samples (its teacher
cache is in its compute/flops, counted in every seed's run). Neither the teacher's own training nor the student's warm-up is counted: every
method shares them.

At the budget every run reached (the smallest final compute over all runs), each run's pass@1 and pass@8 are
linearly interpolated between its evaluations (never extrapolated); the table gives the mean over seeds with a
95% t-interval (3 seeds: mean ± 4.30 s/√3), and the last evaluation of each run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from study_tools import RUNS, ci, done, eval_curve, posttrain, save_figure, study_main

METHODS = {"sft-teacher": "SFT on teacher samples", "opd": "on-policy distillation",
           "opd-offline": "offline OPD (fixed student samples)", "kdrl": "KDRL", "grpo": "GRPO", "dpo": "online DPO"}
SEEDS = (0, 1, 2)
DATA = RUNS / "distill-teacher-data.jsonl"
STUDENT_SAMPLES = RUNS / "distill-student-samples.jsonl"


def run_all() -> None:
    for name in ("teacher", "student"):
        if not done(f"distill-{name}"):
            posttrain("run", f"recipes/distill/{name}.toml")
    if not DATA.exists():
        posttrain("distill-data", str(RUNS / "distill-teacher"), "--out", str(DATA), "--prompts", "2000",
                  "--samples", "2", "--keep", "1", "--max-new-tokens", "8")
    if not STUDENT_SAMPLES.exists():
        posttrain("distill-data", str(RUNS / "distill-student"), "--keep-failed", "--out", str(STUDENT_SAMPLES),
                  "--prompts", "500", "--samples", "4", "--keep", "4", "--max-new-tokens", "8")
    for seed in SEEDS:
        for method in METHODS:
            name = f"distill-{method}-seed{seed}"
            if not done(name):
                posttrain("run", f"recipes/distill/{method}.toml", "--set", f"seed={seed}", "--set", f"name={name}")


def curve(run_dir: Path, offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(compute, pass@1, pass@8) at each evaluation of the run, in order of compute."""
    c = eval_curve(run_dir, ("eval/pass@1", "eval/pass@8"))
    order = np.argsort(c["flops"], kind="stable")
    return offset + c["flops"][order], c["eval/pass@1"][order], c["eval/pass@8"][order]


def meta_of(data: Path) -> dict:
    return json.loads(data.with_name(data.stem + ".meta.json").read_text())


def report() -> str:
    meta = meta_of(DATA)
    offsets = {"sft-teacher": meta["compute/generate_flops"],  # sampling the data is part of the method's work
               "opd-offline": meta_of(STUDENT_SAMPLES)["compute/generate_flops"]}
    curves = {m: [curve(RUNS / f"distill-{m}-seed{s}", offsets.get(m, 0.0)) for s in SEEDS] for m in METHODS}
    budget = min(c[0][-1] for runs in curves.values() for c in runs)
    lines = [(f"Budget: {budget:.3g} FLOPs (the smallest final compute of any run). The SFT data cost "
             f"{meta['compute/generate_flops']:.3g} FLOPs of teacher generation ({meta['rows']} rows; the teacher "
             f"solved {meta['tasks_solved']} of {meta['prompts']} train tasks)."), "",
             ("| method | pass@1 at the budget | pass@8 at the budget | final pass@1 | final pass@8 | final compute "
             "| evaluations |"), "|---|---|---|---|---|---|---|"]
    for m, runs in curves.items():
        at1 = [float(np.interp(budget, x, y1)) for x, y1, _ in runs]
        at8 = [float(np.interp(budget, x, y8)) for x, _, y8 in runs]
        lines.append(f"| {METHODS[m]} | {ci(at1)} | {ci(at8)} | {ci([y1[-1] for _, y1, _ in runs])} | "
                     f"{ci([y8[-1] for _, _, y8 in runs])} | {np.mean([x[-1] for x, _, _ in runs]):.3g} | "
                     f"{len(runs[0][0])} |")
    start = curves["grpo"][0][1][0]
    lines += ["", f"The student's own starting pass@1 (GRPO seed 0, step 0): {start:.3f}."]
    plot(curves, budget)
    return "\n".join(lines)


def plot(curves: dict, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (m, runs), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        for i, (x, y1, _) in enumerate(runs):
            ax.plot(x, y1, "-o", ms=3, color=color, alpha=0.8, label=METHODS[m] if i == 0 else None)
    ax.axvline(budget, ls=":", color="grey", label="equal-compute budget")
    ax.set_xlabel("FLOPs after the shared student checkpoint (teacher passes and data sampling included)")
    ax.set_ylabel("held-out pass@1 (200 problems x 8 samples)")
    ax.set_title("tiny-3m student, tiny-25m teacher, 3-digit addition (3 seeds each)")
    ax.legend(fontsize=8)
    save_figure(fig, "distillation.png")


if __name__ == "__main__":
    study_main(run_all, report)
