"""The staleness study (docs/studies/staleness.md): run it, then tabulate and plot what it measured.

    python scripts/staleness_study.py                      # run what is missing: k in 0,1,2,4 x 3 seeds, local engine
    python scripts/staleness_study.py --vllm-python .venv-vllm/bin/python   # also k = 0 on the vLLM engine
    python scripts/staleness_study.py --report             # only tabulate the finished runs

Every run is `posttrain run recipes/async/staleness.toml --set rollout.max_staleness=K --set seed=S` from the same
SFT'd tiny-3m (runs/distill-student/final; built by recipes/distill/student.toml when missing), one after
another (never two at once on a 2-core machine); a finished run is reused. Seeds vary sampling only. The table
gives final pass@1 and pass@8 (mean over seeds with a 95% t-interval), pass@1 at the equal-compute budget (the
smallest final compute/flops of any run, linear interpolation between evaluations) and at equal wall time, and
the mean seconds per step. The plot draws pass@1 against compute/flops and against wall time.
"""

from __future__ import annotations

import sys

import numpy as np
from study_tools import RUNS, ci, done, eval_curve, posttrain, rows, save_figure, study_main

SEEDS = (0, 1, 2)
KS = (0, 1, 2, 4)


def configs(with_vllm: bool) -> dict[str, tuple[str, int]]:
    """name -> (engine, k)."""
    out = {f"k{k}": ("local", k) for k in KS}
    if with_vllm:
        out["vllm-k0"] = ("vllm", 0)
    return out


def run_all(vllm_python: str | None) -> None:
    if not done("distill-student"):
        posttrain("run", "recipes/distill/student.toml")
    for seed in SEEDS:
        for label, (engine, k) in configs(vllm_python is not None).items():
            name = f"stale-{label}-seed{seed}"
            if not done(name):
                python = vllm_python if engine == "vllm" else sys.executable
                posttrain("run", "recipes/async/staleness.toml", "--set", f"seed={seed}", "--set",
                          f"name={name}", "--set", f"rollout.max_staleness={k}", "--set", f"rollout.engine={engine}",
                          python=python)


def curve(run_dir) -> dict[str, np.ndarray]:
    """compute/flops, elapsed seconds, pass@1 and pass@8 at each evaluation; and seconds per RL step."""
    c = eval_curve(run_dir, ("eval/pass@1", "eval/pass@8"))
    out = {"flops": c["flops"], "wall": c["wall"], "p1": c["eval/pass@1"], "p8": c["eval/pass@8"]}
    out["step_s"] = np.array([float(np.mean([r["time/step_s"] for r in rows(run_dir) if "time/step_s" in r]))])
    return out


def report(with_vllm: bool) -> str:
    names = [c for c in configs(with_vllm) if all((RUNS / f"stale-{c}-seed{s}" / "DONE").exists() for s in SEEDS)]
    curves = {c: [curve(RUNS / f"stale-{c}-seed{s}") for s in SEEDS] for c in names}
    budget = min(r["flops"][-1] for runs in curves.values() for r in runs)
    wall = min(r["wall"][-1] for runs in curves.values() for r in runs)
    lines = [f"Budget: {budget:.3g} FLOPs and {wall:.0f} s of wall time (the smallest final value of any run).", "",
             ("| configuration | final pass@1 | final pass@8 | pass@1 at the FLOP budget | pass@1 at equal wall time "
              "| s / step |"), "|---|---|---|---|---|---|"]
    for c, runs in curves.items():
        lines.append(
            f"| {c} | {ci([r['p1'][-1] for r in runs])} | {ci([r['p8'][-1] for r in runs])} | "
            f"{ci([float(np.interp(budget, r['flops'], r['p1'])) for r in runs])} | "
            f"{ci([float(np.interp(wall, r['wall'], r['p1'])) for r in runs])} | "
            f"{np.mean([r['step_s'][0] for r in runs]):.2f} |")
    plot(curves)
    return "\n".join(lines)


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (c, runs), color in zip(curves.items(), colors, strict=False):
        for i, r in enumerate(runs):
            axes[0].plot(r["flops"], r["p1"], "-o", ms=3, color=color, alpha=0.8, label=c if i == 0 else None)
            axes[1].plot(r["wall"], r["p1"], "-o", ms=3, color=color, alpha=0.8)
    axes[0].set_xlabel("compute/flops (generation, logprob passes, training)")
    axes[1].set_xlabel("wall time (s, evaluations included)")
    axes[0].set_ylabel("held-out pass@1 (200 problems x 8 samples)")
    axes[0].legend(fontsize=8, title="max_staleness")
    fig.suptitle("tiny-3m, 3-digit addition, RL from the same SFT checkpoint (3 seeds each)")
    save_figure(fig, "staleness.png")


if __name__ == "__main__":
    study_main(run_all, lambda vllm_python: report(vllm_python is not None),
               **{"--vllm-python": "a python with vllm installed: also run k = 0 on the vLLM engine"})
