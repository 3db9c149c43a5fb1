"""The curriculum study (docs/studies/curriculum.md): run it, then tabulate and plot what it measured.

    python scripts/curriculum_study.py             # run what is missing: 4 samplers x 3 seeds
    python scripts/curriculum_study.py --report    # only tabulate the finished runs

Every run is `posttrain run recipes/curriculum/mixed.toml --set rl.sampler=S --set seed=K` from the same SFT'd
tiny-3m (runs/distill-student/final, built by recipes/distill/student.toml when missing), on the same fixed pool of
2,000 additions of 1-5 digits (sampler_args.pool_size), one run after another; a finished run is reused. The table:
the share of sampled groups with any reward variance (rollout/effective_groups_frac, the groups GRPO can learn
from; mean over steps and over the last 50 steps), the share of steps in which fewer than a quarter of the groups
had any, held-out pass@1 on 1-5 digits and on 5 digits alone at the end and at the FLOP budget every run reached
(linear interpolation between evaluations), and the iso-compute ranking: each sampler's pass@1 at the budget
minus uniform's, paired by seed, with a 95% t-interval.
"""

from __future__ import annotations

import numpy as np
from study_tools import RUNS, ci, done, eval_curve, posttrain, rows, save_figure, study_main, t_interval

SAMPLERS = ("uniform", "pools", "pcl", "dump")  # each with its defaults (dump: arms = difficulty)
SEEDS = (0, 1, 2)


def name(sampler: str, seed: int) -> str:
    return f"cur-{sampler}-seed{seed}"


def run_all() -> None:
    if not done("distill-student"):
        posttrain("run", "recipes/distill/student.toml")
    for seed in SEEDS:
        for sampler in SAMPLERS:
            if not done(name(sampler, seed)):
                posttrain("run", "recipes/curriculum/mixed.toml", "--set", f"rl.sampler={sampler}", "--set",
                          f"seed={seed}", "--set", f"name={name(sampler, seed)}")


def group_shares(run: str) -> tuple[float, float, float]:
    """(mean effective-group share, the same over the last 50 steps, share of steps under 0.25)."""
    eff = [r["rollout/effective_groups_frac"] for r in rows(RUNS / run) if "rollout/effective_groups_frac" in r]
    return float(np.mean(eff)), float(np.mean(eff[-50:])), float(np.mean([e < 0.25 for e in eff]))


def report() -> str:
    names = [s for s in SAMPLERS if all(done(name(s, k)) for k in SEEDS)]
    curves = {s: [eval_curve(RUNS / name(s, k), ("eval/pass@1", "eval/d5/pass@1")) for k in SEEDS] for s in names}
    budget = min(c["flops"][-1] for runs in curves.values() for c in runs)
    at_budget = {s: [float(np.interp(budget, c["flops"], c["eval/pass@1"])) for c in runs]
                 for s, runs in curves.items()}
    lines = [f"FLOP budget: {budget:.3g} (the smallest final compute/flops of any run).", "",
             ("| sampler | groups with variance (all steps) | (last 50 steps) | steps < 25% | final pass@1 | "
              "final pass@1, 5 digits | pass@1 at the budget | minus uniform's (paired) |"),
             "|---|---|---|---|---|---|---|---|"]
    for s, runs in curves.items():
        shares = [group_shares(name(s, k)) for k in SEEDS]
        diff = (ci([a - b for a, b in zip(at_budget[s], at_budget["uniform"], strict=True)])
                if "uniform" in at_budget and s != "uniform" else "")
        lines.append(f"| {s} | {ci([x[0] for x in shares])} | {ci([x[1] for x in shares])} | "
                     f"{ci([x[2] for x in shares])} | {ci([c['eval/pass@1'][-1] for c in runs])} | "
                     f"{ci([c['eval/d5/pass@1'][-1] for c in runs])} | {ci(at_budget[s])} | {diff} |")
    ranking = sorted(at_budget, key=lambda s: -t_interval(at_budget[s])[0])
    lines += ["", "Iso-compute ranking (pass@1 at the budget, best first): " + " > ".join(ranking)]
    plot(curves)
    return "\n".join(lines)


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (s, runs), color in zip(curves.items(), colors, strict=False):
        for k, c in enumerate(runs):
            label = s if k == 0 else None
            axes[0].plot(c["flops"], c["eval/pass@1"], "-o", ms=3, color=color, alpha=0.8, label=label)
            axes[1].plot(c["flops"], c["eval/d5/pass@1"], "-o", ms=3, color=color, alpha=0.8)
            eff = [r["rollout/effective_groups_frac"] for r in rows(RUNS / name(s, SEEDS[k]))
                   if "rollout/effective_groups_frac" in r]
            smooth = np.convolve(eff, np.ones(10) / 10, mode="valid")
            axes[2].plot(np.arange(len(smooth)) + 10, smooth, color=color, alpha=0.8)
    axes[0].set_ylabel("held-out pass@1, 1-5 digits")
    axes[1].set_ylabel("held-out pass@1, 5 digits")
    for ax in axes[:2]:
        ax.set_xlabel("compute/flops (generation, logprob passes, training)")
    axes[2].set_xlabel("RL step")
    axes[2].set_ylabel("groups with reward variance (10-step mean)")
    axes[0].legend(fontsize=8, title="rl.sampler")
    fig.suptitle("tiny-3m, additions of 1-5 digits from a 2,000-prompt pool, RL from the same SFT checkpoint "
                 "(3 seeds each)")
    save_figure(fig, "curriculum.png")


if __name__ == "__main__":
    study_main(run_all, report)
