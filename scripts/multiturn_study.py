"""The multi-turn studies (docs/studies/multiturn.md):
(a) retry_with_feedback on 3-digit additions, 3 seeds: does RL on whole episodes cut the turns to solve and raise
    the share solved?
(b) calculator, 3 seeds: does the model learn to call the tool for large operands (and not for small ones)?
(c) guess_number, 1 seed: the same question as (a) on a task that needs the feedback.

    python scripts/multiturn_study.py            # run what is missing, one run after another, then tabulate
    python scripts/multiturn_study.py --report   # only tabulate the finished runs

Runs: mt-retry-seed{k} = recipes/multiturn/retry.toml (RL from the quickstart's SFT checkpoint, built when
missing), mt-calc-seed{k} = recipes/multiturn/calculator.toml and mt-guess-seed{k} =
recipes/multiturn/guess-number.toml (SFT on demonstrated episodes, then RL), every run's seed k. "Before" is the
rl-step0 evaluation (the RL starting point), "after" the final one. Differences are paired by seed, with a 95%
t-interval.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from study_tools import RUNS, ci, done, eval_curve, posttrain, save_figure, study_main

# (recipe, seeds): guess_number has one seed only: it did not learn (docs/studies/multiturn.md)
STUDIES = {"retry": ("recipes/multiturn/retry.toml", (0, 1, 2)),
           "calc": ("recipes/multiturn/calculator.toml", (0, 1, 2)),
           "guess": ("recipes/multiturn/guess-number.toml", (0,))}


def name(study: str, seed: int) -> str:
    return f"mt-{study}-seed{seed}"


def run_all() -> None:
    if not done("distill-student"):
        posttrain("run", "recipes/distill/student.toml")
    for study, (recipe, seeds) in STUDIES.items():
        for seed in seeds:
            if not done(name(study, seed)):
                posttrain("run", recipe, "--set", f"seed={seed}", "--set", f"name={name(study, seed)}")


def evaluation(run: str, tag: str) -> dict:
    return json.loads((RUNS / run / "eval" / f"{tag}.json").read_text())


def measures(result: dict) -> dict[str, float]:
    episode = result.get("episode", {})
    return {"solved (pass@1)": result["pass@1"]["mean"], "greedy solved": result["greedy_acc"],
            "turns to solve": episode.get("turns_to_solve", float("nan")), "turns": episode.get("turns_mean"),
            "tool calls": episode.get("tool_calls_mean"), "reward per turn": episode.get("reward_per_turn")}


def before_after(study: str, suite: str | None = None) -> list[tuple[dict, dict]]:
    out = []
    for seed in STUDIES[study][1]:
        before, after = (evaluation(name(study, seed), tag) for tag in ("rl-step0", "rl"))
        if suite is not None:
            before, after = before["suites"][suite], after["suites"][suite]
        out.append((measures(before), measures(after)))
    return out


def table(pairs: list[tuple[dict, dict]], keys: list[str]) -> list[str]:
    lines = ["| measure | after SFT (RL step 0) | after RL | RL minus SFT (paired) |", "|---|---|---|---|"]
    for key in keys:
        b, a = [p[0][key] for p in pairs], [p[1][key] for p in pairs]
        lines.append(f"| {key} | {ci(b)} | {ci(a)} | {ci([y - x for x, y in zip(b, a, strict=True)])} |")
    return lines


def figure() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for seed in STUDIES["retry"][1]:
        run = RUNS / name("retry", seed)
        c = eval_curve(run, ("eval/pass@1", "eval/episode/turns_mean"))
        axes[0].plot(c["flops"], c["eval/pass@1"], marker="o", label=f"seed {seed}")
        axes[1].plot(c["flops"], c["eval/episode/turns_mean"], marker="o", label=f"seed {seed}")
    for seed in STUDIES["calc"][1]:
        calc = eval_curve(RUNS / name("calc", seed), ("eval/small/episode/tool_calls_mean",
                                                      "eval/large/episode/tool_calls_mean"))
        axes[2].plot(calc["flops"], calc["eval/large/episode/tool_calls_mean"], marker="o", color=f"C{seed}",
                     label=f"4-digit, seed {seed}")
        axes[2].plot(calc["flops"], calc["eval/small/episode/tool_calls_mean"], marker="x", ls="--",
                     color=f"C{seed}", label=f"1-digit, seed {seed}")
    for ax, title in zip(axes, ("retry_with_feedback: solved (pass@1)", "retry_with_feedback: turns per episode",
                                "calculator: tool calls per episode"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("compute of the run (FLOPs)")
        ax.legend(fontsize=7)
    save_figure(fig, "multiturn.png")


def report() -> str:
    episode = ["solved (pass@1)", "greedy solved", "turns to solve", "turns", "reward per turn"]
    lines = ["## (a) retry_with_feedback, 3-digit additions", ""] + table(before_after("retry"), episode)
    for suite, label in (("small", "1-digit additions"), ("large", "4-digit additions")):
        lines += ["", f"## (b) calculator, {label} (eval suite '{suite}')", ""]
        lines += table(before_after("calc", suite), ["solved (pass@1)", "tool calls", "turns"])
    lines += ["", "## (c) guess_number", ""] + table(before_after("guess"), episode)
    figure()
    return "\n".join(lines)


if __name__ == "__main__":
    study_main(run_all, report)
