"""How the cost of one RL step grows with group size, completion length and model size, measured, with the compute
ledger's FLOPs beside each time so a larger run can be extrapolated from a small one.

    .venv/bin/python benchmarks/cost_growth.py --json growth.json > growth.log 2>&1   # about 15 min on 2 cores

Each row is the quickstart's RL stage (recipes/quickstart.toml [rl]: GRPO advantages, PPO clip, token-mean loss)
run in this process for --steps steps from a preset's random weights, varying one axis from the base row (tiny-3m,
--prompts prompts x group 8, 32 new tokens):
  group size       4, 8, 16, 32
  completion       8, 32, 128, 256 new tokens
  model            tiny-3m, tiny-25m, tiny-100m
Random weights earn no reward, so the benchmark trains every sample (rl.group_filter = "none",
rl.skip_zero_advantage = false): the step does its full work. Completions stop at EOS as in a run; the ledger
counts the tokens actually generated and trained, and the table prints the mean completion length.

Columns (means over the steps after the first, which is dropped as warm-up): s/step and its generate / train
split (`time/generate_s`, `time/logprob_s` + `time/train_s`), the ledger's GFLOP per step (`compute/generate_flops`,
`compute/train_flops` + `compute/old_flops` + `compute/ref_flops`), the achieved GFLOP/s of each phase, and
"predicted s": each phase's FLOPs at the base row's achieved rate for that phase. measured / predicted above 1.25
is flagged: that term costs more than its FLOPs say (per-token overhead, attention memory traffic, allocator),
so extrapolating from FLOPs alone would underestimate it; below 1 means bigger matmuls run closer to the limit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from provenance import commit, cpu_model, gemm_gflops

ROOT = Path(__file__).resolve().parent.parent
BASE = {"preset": "tiny-3m", "group": 8, "tokens": 32}
AXES = {"group": [4, 8, 16, 32], "tokens": [8, 32, 128, 256], "preset": ["tiny-3m", "tiny-25m", "tiny-100m"]}
FLAG = 1.25


def measure(point: dict[str, Any], prompts: int, steps: int, out: Path) -> dict[str, float]:
    from posttrain.config import read_toml, resolve_paths, validate
    from posttrain.runner import run

    quickstart = ROOT / "recipes" / "quickstart.toml"
    raw = resolve_paths(read_toml(quickstart, missing=f"{quickstart}: not found"), quickstart.parent)
    raw.pop("sft")
    name = f"{point['preset']}-g{point['group']}-t{point['tokens']}"
    raw.update(recipe=["rl"], name=name, output_dir=str(out), threads=torch.get_num_threads())
    raw["model"] = {**raw["model"], "path": point["preset"]}
    raw["rl"] = {**raw["rl"], "steps": steps, "eval_every": 0, "prompts_per_step": prompts,
                 "group_size": point["group"], "max_new_tokens": point["tokens"], "group_filter": "none",
                 "skip_zero_advantage": False, "log_samples": 0}
    raw["eval"] = {**raw["eval"], "at_start": False, "problems": 8}
    raw["checkpoint"] = {"every": 0}
    raw["tracking"] = {"tensorboard": False}
    cfg = validate(raw, str(quickstart))
    run(cfg, fresh=True)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]

    def mean(*keys: str) -> float:
        return statistics.mean(sum(r.get(k, 0.0) for k in keys) for r in steps_rows[1:])

    def per_step(*keys: str) -> float:  # compute/* are running totals: a step's FLOPs are a difference
        totals = [sum(r.get(k, 0.0) for k in keys) for r in steps_rows]
        return statistics.mean(b - a for a, b in itertools.pairwise(totals))

    return {"step_s": mean("time/step_s"), "gen_s": mean("time/generate_s"),
            "train_s": mean("time/logprob_s", "time/train_s"), "gen_flops": per_step("compute/generate_flops"),
            "train_flops": per_step("compute/train_flops", "compute/old_flops", "compute/ref_flops"),
            "len_mean": mean("rollout/len_mean"), "samples": mean("rollout/samples")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="RL steps per row (the first is dropped)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--axes", default=",".join(AXES), help="which of group,tokens,preset to vary")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.models import resolve_bf16

    bf16 = resolve_bf16("auto", torch.device("cpu"))
    precision = "bf16" if bf16 else "fp32"
    gemm = gemm_gflops(torch.bfloat16 if bf16 else torch.float32)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  commit {commit()}  {cpu_model()}  {torch.get_num_threads()} threads  "
          f"{precision}  GEMM 2048^3 {gemm:.0f} GFLOP/s  load avg {os.getloadavg()[0]:.2f}", flush=True)
    print(f"RL step of the quickstart's [rl], {a.prompts} prompts x group, {a.steps} steps per row (first dropped), "
          f"random weights, every sample trained; base row {BASE}\n", flush=True)
    results: list[dict[str, Any]] = []
    head = ("| axis | value | completion tokens (mean) | s/step | generate s | train s | GFLOP/step (gen + train) | "
            "gen GFLOP/s | train GFLOP/s | predicted s | measured / predicted |")
    print(head)
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = measure(BASE, a.prompts, a.steps, Path(tmp))
        cache: dict[tuple, dict[str, float]] = {tuple(BASE.values()): base}
        rate = {"gen": base["gen_flops"] / base["gen_s"], "train": base["train_flops"] / base["train_s"]}
        for axis in a.axes.split(","):
            for value in AXES[axis]:
                point = {**BASE, axis: value}
                key = tuple(point.values())
                if key not in cache:
                    cache[key] = measure(point, a.prompts, a.steps, Path(tmp))
                m = cache[key]
                predicted = m["gen_flops"] / rate["gen"] + m["train_flops"] / rate["train"]
                ratio = (m["gen_s"] + m["train_s"]) / predicted
                flag = " **costs more than its FLOPs**" if ratio > FLAG else ""
                results.append({"axis": axis, "value": value, **point, **m, "predicted_s": predicted, "ratio": ratio})
                print(f"| {axis} | {value} | {m['len_mean']:.1f} | {m['step_s']:.3f} | {m['gen_s']:.3f} | "
                      f"{m['train_s']:.3f} | {m['gen_flops'] / 1e9:.1f} + {m['train_flops'] / 1e9:.1f} | "
                      f"{m['gen_flops'] / m['gen_s'] / 1e9:.1f} | {m['train_flops'] / m['train_s'] / 1e9:.1f} | "
                      f"{predicted:.3f} | {ratio:.2f}{flag} |", flush=True)
    print("\npredicted s = generate FLOPs / the base row's generate GFLOP/s + train FLOPs / its train GFLOP/s (the "
          "generate + train time the ledger predicts from the base row); it leaves out scoring and bookkeeping, "
          "which s/step includes.")
    if a.json:
        Path(a.json).write_text(json.dumps({"gemm_gflops": gemm, "precision": precision, "commit": commit(),
                                            "args": vars(a), "base": BASE, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
