"""The pretraining studies (docs/studies/pretraining.md): (a) RLP vs continued pretraining at matched FLOPs and
(b) front-loading reasoning traces into pretraining, each judged by the same SFT + RL afterwards, 3 seeds.

    python scripts/pretraining_study.py            # run what is missing, one run after another, then tabulate
    python scripts/pretraining_study.py --report   # only tabulate the finished runs

Per seed k (every run's seed is k):
  fl-plain-seed{k}       recipes/front-loading/pretrain-plain.toml      tiny-3m from random init, plain statements
  fl-reasoning-seed{k}   recipes/front-loading/pretrain-reasoning.toml  the same token budget, half worked solutions
  rlps-rlp-seed{k}       recipes/rlp-study/rlp.toml on fl-plain-seed{k}  100 RLP steps
  rlps-continue-seed{k}  recipes/rlp-study/continue.toml on fl-plain-seed{k}, pretrain.tokens set so that its
                         FLOPs equal what rlps-rlp-seed{k} spent (compute/rlp_flops)
and the identical post-training recipes/front-loading/sft-rl.toml (600 SFT steps on 1-2 digit additions, 100 RL
steps on 2-digit ones) on each of the four:
  post-{plain,reasoning,rlp,continue}-seed{k}.
(a) compares post-rlp with post-continue (and post-plain, no extra compute); (b) post-reasoning with post-plain.
Differences are paired by seed, with a 95% t-interval.
"""

from __future__ import annotations

import json

import numpy as np
from study_tools import RUNS, ci, done, posttrain, rows, study_main

SEEDS = (0, 1, 2)
BASES = {"plain": "fl-plain", "reasoning": "fl-reasoning", "rlp": "rlps-rlp", "continue": "rlps-continue"}


def run_name(prefix: str, seed: int) -> str:
    return f"{prefix}-seed{seed}"


def last(run: str, key: str) -> float:
    return float([r[key] for r in rows(RUNS / run) if key in r][-1])


def matched_tokens(seed: int) -> int:
    """Pretraining tokens whose training FLOPs equal the RLP arm's total (the base run's FLOPs per token)."""
    base, rlp = run_name("fl-plain", seed), run_name("rlps-rlp", seed)
    per_token = last(base, "compute/pretrain_flops") / last(base, "train/tokens")
    return int(last(rlp, "compute/rlp_flops") / per_token)


def run_all() -> None:
    for seed in SEEDS:
        common = ("--set", f"seed={seed}")
        for arm in ("plain", "reasoning"):
            if not done(run_name(f"fl-{arm}", seed)):
                posttrain("run", f"recipes/front-loading/pretrain-{arm}.toml", *common,
                          "--set", f"name={run_name(f'fl-{arm}', seed)}")
        base = f"model.path=runs/{run_name('fl-plain', seed)}/final"
        if not done(run_name("rlps-rlp", seed)):
            posttrain("run", "recipes/rlp-study/rlp.toml", *common, "--set", base,
                      "--set", f"name={run_name('rlps-rlp', seed)}")
        if not done(run_name("rlps-continue", seed)):
            posttrain("run", "recipes/rlp-study/continue.toml", *common, "--set", base,
                      "--set", f"pretrain.tokens={matched_tokens(seed)}", "--set",
                      f"name={run_name('rlps-continue', seed)}")
        for arm, prefix in BASES.items():
            if not done(run_name(f"post-{arm}", seed)):
                posttrain("run", "recipes/front-loading/sft-rl.toml", *common,
                          "--set", f"model.path=runs/{run_name(prefix, seed)}/final",
                          "--set", f"name={run_name(f'post-{arm}', seed)}")


def evaluation(run: str, tag: str) -> dict:
    return json.loads((RUNS / run / "eval" / f"{tag}.json").read_text())


def arm_results(arm: str) -> list[dict[str, float]]:
    out = []
    for seed in SEEDS:
        base, post = run_name(BASES[arm], seed), run_name(f"post-{arm}", seed)
        held = [r for r in rows(RUNS / base) if "pretrain/eval_loss" in r or "rlp/eval_loss" in r]
        stage_flops = [r for r in rows(RUNS / base) if "compute/flops" in r][-1]
        sft, rl = evaluation(post, "sft"), evaluation(post, "rl")
        out.append({"held_out_nll": held[-1].get("rlp/eval_loss", held[-1].get("pretrain/eval_loss")),
                    "base_flops": stage_flops["compute/flops"],
                    "sft_pass1": sft["pass@1"]["mean"], "rl_pass1": rl["pass@1"]["mean"],
                    "rl_pass8": rl["pass@8"]["mean"]})
    return out


def table(arms: tuple[str, ...], reference: str) -> list[str]:
    results = {a: arm_results(a) for a in arms}
    lines = [("| base model | FLOPs of the run that made it (rlp, continue: on top of plain) | held-out NLL of the "
              "base | pass@1 after SFT | pass@1 after RL | pass@8 after RL | "
              f"pass@1 after RL minus {reference}'s (paired) |"), "|---|---|---|---|---|---|---|"]
    for a, rs in results.items():
        diff = "" if a == reference else ci([x["rl_pass1"] - y["rl_pass1"]
                                             for x, y in zip(rs, results[reference], strict=True)])
        lines.append(f"| {a} | {np.mean([r['base_flops'] for r in rs]):.3g} | "
                     f"{ci([r['held_out_nll'] for r in rs])} | {ci([r['sft_pass1'] for r in rs])} | "
                     f"{ci([r['rl_pass1'] for r in rs])} | {ci([r['rl_pass8'] for r in rs])} | {diff} |")
    return lines


def complete(arms: tuple[str, ...]) -> bool:
    return all(done(run_name(f"post-{a}", k)) and done(run_name(BASES[a], k)) for a in arms for k in SEEDS)


def report() -> str:
    out = []
    if complete(("continue", "rlp", "plain")):
        out += ["(a) RLP vs continued pretraining at matched FLOPs (plain: the base with no extra compute)", "",
                *table(("continue", "rlp", "plain"), "continue"), "",
                "RLP arm, last step: " + "; ".join(
                    f"seed {k}: info gain {last(run_name('rlps-rlp', k), 'rlp/info_gain'):+.3f}, drift gain "
                    f"{last(run_name('rlps-rlp', k), 'rlp/drift_gain'):+.3f}" for k in SEEDS), ""]
    else:
        out.append("(a) not complete")
    if complete(("plain", "reasoning")):
        out += ["(b) front-loading reasoning traces into pretraining", "", *table(("plain", "reasoning"), "plain")]
    else:
        out.append("(b) not complete")
    return "\n".join(out)


if __name__ == "__main__":
    study_main(run_all, report)
