"""The diversity study (docs/studies/diversity.md): does G-Vendi rank SFT sets as their transfer accuracy does?

    python scripts/diversity_study.py            # make the sets, score them, SFT on each (3 seeds), tabulate
    python scripts/diversity_study.py --report   # only tabulate the finished runs

Five synthetic SFT sets of 2,000 arithmetic examples each (rows {prompt, completion, answer} from the arithmetic
environment's training split): additions of 2 digits only, additions of 1-3 digits, additions and subtractions,
a random mix of +, - and *, and a G-Vendi-selected 2,000 of an 8,000-example mix (`posttrain data select`,
verifier filter). Each set is scored by `posttrain data diversity` under a trained proxy (the shared SFT'd tiny-3m,
runs/distill-student/final) and by the n-gram baselines; then the shared SFT'd tiny-3m is trained on each set
(recipes/diversity/sft.toml, 3 seeds, from the same SFT checkpoint) and evaluated on three transfer suites (4-digit +, 3-digit -, 2-digit *).
Transfer accuracy = the mean pass@1 of the suites. The rank agreement is Spearman's rho between a score and the
sets' mean transfer accuracy, with a bootstrap CI that resamples each set's seeds.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
from scipy import stats
from study_tools import ROOT, RUNS, ci, done, eval_curve, posttrain, study_main

DATA = RUNS / "diversity-data"
SIZE = 2000
SETS = {  # name -> arithmetic arguments of its examples (gvendi: selected from a pool)
    "add2": {"digits": 2, "ops": "+"},
    "add": {"digits": [1, 3], "ops": "+"},
    "addsub": {"digits": [1, 3], "ops": "+-"},
    "mix": {"digits": [1, 3], "ops": "+-*"},
    "gvendi": {"digits": [1, 3], "ops": "+-*"},
}
SEEDS = (0, 1, 2)
PROXY = "runs/distill-student/final"
SUITES = ("add4", "sub3", "mul2")


def write_set(name: str, args: dict, n: int, seed: int) -> None:
    from posttrain.envs import make_env

    env = make_env("arithmetic", args)
    rows, seen = [], set()
    for task in env.tasks("train", seed):
        if task.id not in seen:
            seen.add(task.id)
            rows.append({"prompt": task.question, "completion": task.solution, "answer": task.answer})
        if len(rows) == n:
            break
    (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_sets() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, args in SETS.items():
        if name != "gvendi" and not (DATA / f"{name}.jsonl").exists():
            write_set(name, args, SIZE, seed=0)
    if not (DATA / "gvendi.jsonl").exists():
        write_set("pool", SETS["gvendi"], 4 * SIZE, seed=1)
        posttrain("data", "select", str(DATA / "pool.jsonl"), "-n", str(SIZE), "-o", str(DATA / "gvendi.jsonl"),
                  "--filter", "verifier", "--env", "arithmetic", "--env-arg", "ops=+-*", "--model", PROXY)


def score_sets() -> dict:
    out = {}
    for name in SETS:
        path = DATA / f"{name}.score.json"
        if not path.exists():
            print(f"+ posttrain data diversity {DATA / name}.jsonl --model {PROXY} --json", flush=True)
            proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "data", "diversity",
                                   str(DATA / f"{name}.jsonl"), "--model", PROXY, "--json"], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            path.write_text(proc.stdout)
        out[name] = json.loads(path.read_text())
    return out


def run_all() -> None:
    if not done("distill-student"):
        posttrain("run", "recipes/distill/student.toml")
    make_sets()
    score_sets()
    for seed, name in itertools.product(SEEDS, SETS):
        run = f"div-{name}-seed{seed}"
        if not done(run):
            posttrain("run", "recipes/diversity/sft.toml", "--set", f"sft.data_path={DATA / f'{name}.jsonl'}",
                      "--set", f"seed={seed}", "--set", f"name={run}")


def final(run: str) -> dict[str, float]:
    """The final evaluation's pass@1 in domain and on each suite."""
    c = eval_curve(RUNS / run, ("eval/pass@1", *(f"eval/{s}/pass@1" for s in SUITES)))
    out = {"in_domain": float(c["eval/pass@1"][-1])}
    out.update({s: float(c[f"eval/{s}/pass@1"][-1]) for s in SUITES})
    out["transfer"] = float(np.mean([out[s] for s in SUITES]))
    return out


def spearman_ci(scores: dict[str, float], transfer: dict[str, list[float]], draws: int = 2000) -> tuple:
    names = list(scores)
    rho = stats.spearmanr([scores[n] for n in names], [np.mean(transfer[n]) for n in names]).statistic
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(draws):
        means = [np.mean(rng.choice(transfer[n], len(transfer[n]))) for n in names]
        boot.append(stats.spearmanr([scores[n] for n in names], means).statistic)
    boot = np.array([b for b in boot if np.isfinite(b)])
    return float(rho), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def report() -> str:
    scores = score_sets()
    names = [n for n in SETS if all(done(f"div-{n}-seed{k}") for k in SEEDS)]
    results = {n: [final(f"div-{n}-seed{k}") for k in SEEDS] for n in names}
    lines = ["| set | G-Vendi | bigram Vendi | distinct-2 | in-domain pass@1 | add4 | sub3 | mul2 | transfer (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s, r = scores[n], results[n]
        lines.append(f"| {n} | {s['g_vendi']:.2f} | {s['ngram_vendi_2']:.2f} | {s['distinct_2']:.4f} | "
                     f"{ci([x['in_domain'] for x in r])} | " + " | ".join(ci([x[k] for x in r]) for k in SUITES)
                     + f" | {ci([x['transfer'] for x in r])} |")
    transfer = {n: [x["transfer"] for x in results[n]] for n in names}
    lines.append("")
    for key, label in (("g_vendi", "G-Vendi"), ("ngram_vendi_2", "bigram Vendi"), ("distinct_2", "distinct-2")):
        rho, lo, hi = spearman_ci({n: scores[n][key] for n in names}, transfer)
        lines.append(f"- Spearman rho({label}, transfer accuracy) = {rho:.2f} (95% bootstrap over seeds: "
                     f"[{lo:.2f}, {hi:.2f}])")
    return "\n".join(lines)


if __name__ == "__main__":
    study_main(run_all, report)
