"""The reward-controls study (docs/studies/controls.md): does RL on this model gain from the reward, or from the
update itself? True vs random vs incorrect vs format-only rewards, 3 seeds each.

    python scripts/controls_study.py             # run what is missing: 4 rewards x 3 seeds, one after another
    python scripts/controls_study.py --report    # only tabulate the finished runs

Every run is `posttrain run recipes/controls/<reward>.toml --set seed=K` from the same SFT'd tiny-3m
(runs/distill-student/final, the quickstart's SFT; built by recipes/distill/student.toml when missing), 150 RL steps
of the quickstart's RL (GRPO advantages, PPO clip, zero-variance groups dropped). The starting point is each run's
rl-step0 evaluation (the SFT checkpoint). The table: held-out pass@1 and pass@8 at the start and the end, the gain
over the SFT checkpoint with its 95% t-interval over seeds, each control's gain minus the true reward's (paired
by seed), and what the controls trained on (the mean training reward) against what they got right (the rollout
pass rate).
"""

from __future__ import annotations

import numpy as np
from study_tools import RUNS, ci, done, eval_curve, posttrain, rows, save_figure, study_main

REWARDS = ("true", "random", "incorrect", "format")
SEEDS = (0, 1, 2)


def name(reward: str, seed: int) -> str:
    return f"controls-{reward}-seed{seed}"


def run_all() -> None:
    if not done("distill-student"):
        posttrain("run", "recipes/distill/student.toml")
    for seed in SEEDS:
        for reward in REWARDS:
            if not done(name(reward, seed)):
                posttrain("run", f"recipes/controls/{reward}.toml", "--set", f"seed={seed}", "--set",
                          f"name={name(reward, seed)}")


def curve(run: str) -> dict[str, np.ndarray]:
    return eval_curve(RUNS / run, ("eval/pass@1", "eval/pass@8"))


def trained_on(run: str) -> tuple[float, float]:
    """(mean training reward, mean rollout pass rate) over the run's steps."""
    r = [x for x in rows(RUNS / run) if "rollout/reward_mean" in x]
    return float(np.mean([x["rollout/reward_mean"] for x in r])), float(np.mean([x["rollout/pass_rate"] for x in r]))


def report() -> str:
    names = [r for r in REWARDS if all(done(name(r, k)) for k in SEEDS)]
    curves = {r: [curve(name(r, k)) for k in SEEDS] for r in names}
    gain = {r: [float(c["eval/pass@1"][-1] - c["eval/pass@1"][0]) for c in cs] for r, cs in curves.items()}
    lines = [("| reward | pass@1 start | pass@1 end | gain over SFT | gain minus the true reward's (paired) | "
              "pass@8 start | pass@8 end | training reward (mean) | rollout pass rate (mean) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r, cs in curves.items():
        vs_true = (ci([a - b for a, b in zip(gain[r], gain["true"], strict=True)])
                   if "true" in gain and r != "true" else "")
        seen = [trained_on(name(r, k)) for k in SEEDS]
        lines.append(f"| {r} | {ci([c['eval/pass@1'][0] for c in cs])} | {ci([c['eval/pass@1'][-1] for c in cs])} | "
                     f"{ci(gain[r])} | {vs_true} | {ci([c['eval/pass@8'][0] for c in cs])} | "
                     f"{ci([c['eval/pass@8'][-1] for c in cs])} | {ci([s[0] for s in seen])} | "
                     f"{ci([s[1] for s in seen])} |")
    if names:
        plot(curves)
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, np.ndarray]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (r, cs) in enumerate(curves.items()):
        for k, c in enumerate(cs):
            x = c["flops"] - c["flops"][0]
            for ax, metric in zip(axes, ("eval/pass@1", "eval/pass@8"), strict=True):
                ax.plot(x, c[metric], color=f"C{i}", alpha=0.8, label=r if k == 0 else None, marker=".")
    for ax, metric in zip(axes, ("held-out pass@1", "held-out pass@8"), strict=True):
        ax.set_xlabel("RL compute (FLOPs since RL started)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(title="training reward")
    save_figure(fig, "controls.png")


if __name__ == "__main__":
    study_main(run_all, report)
