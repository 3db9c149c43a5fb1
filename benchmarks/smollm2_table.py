"""One memory and time table for SmolLM2-135M-Instruct (issue 38, item 7): an RL step's seconds split into
generation, scoring, the logprob passes and training, and the peak RSS, for full fine-tuning and LoRA, in bf16
autocast and fp32, printed in one run.

    python benchmarks/smollm2_table.py                       # 4 configurations x 4 RL steps (first one dropped)
    python benchmarks/smollm2_table.py --steps 3 --precisions fp32 --json table.json

Each configuration is its own `posttrain run` process (so its peak RSS is its own), on the same recipe: the
`arithmetic` environment with 2-3-digit additions asked the way a chat model reads them (hint "Give only the
number.", empty system prompt), 8 prompts x 8 samples x up to 32 new tokens a step, GRPO defaults, the local
engine, `threads` = all cores, and every sample trained (`skip_zero_advantage = false`: with the default, a group
whose rewards all agree skips its forward and backward, so the training time would measure the rewards, not the
model). The figures are the medians over the steps after the first (its one-time costs:
allocation, the first LoRA merge), read from metrics.jsonl: `time/generate_s` less `time/score_s` (sampling and
decoding), `time/score_s` (the verifier), `time/logprob_s` (old-policy / mismatch passes), `time/train_s`
(forward + backward + optimizer step), `time/step_s` (the whole step) and the run's peak RSS (summary.json).
bf16 is skipped, and says so, on a CPU without bf16 matrix units (it would be emulated, far slower).
The weights are llama.cpp's Q4_1 quantization of SmolLM2-135M-Instruct, dequantized (models/sources.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from posttrain import rundir
from posttrain.models import bf16_is_fast, resolve_model_path

RECIPE = """
recipe = "rl"
name = "bench"
seed = 0
[model]
path = "{model}"
[env]
name = "arithmetic"
args = {{ digits = [2, 3], hint = "Give only the number.", system_prompt = "" }}
[rl]
steps = {steps}
prompts_per_step = 8
group_size = 8
max_new_tokens = 32
skip_zero_advantage = false
[eval]
problems = 2
samples = 1
ks = [1]
max_new_tokens = 4
at_start = false
[checkpoint]
every = 0
"""
PHASES = {"generate": "time/generate_s", "score": "time/score_s", "logprobs": "time/logprob_s",
          "train": "time/train_s", "step": "time/step_s"}


def measure(model: Path, out: Path, *, lora: bool, bf16: bool, steps: int) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.toml"
    recipe.write_text(RECIPE.format(model=model, steps=steps))
    sets = [f"model.bf16={'true' if bf16 else 'false'}", f"output_dir={out}"]
    if lora:
        sets.append("model.lora={r = 16, alpha = 32}")
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--fresh",
           *[x for s in sets for x in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    run_dir = out / "bench"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r][1:]  # the first: one-time costs
    if not steps_rows:
        raise SystemExit(f"{run_dir}: no RL step after the first to measure (give --steps >= 2)")
    med = {k: statistics.median(r.get(v, 0.0) for r in steps_rows) for k, v in PHASES.items()}
    med["generate"] -= med["score"]  # time/generate_s is the whole collection, the verifier included
    med["tokens_per_s"] = statistics.median(r["perf/gen_tokens_per_s"] for r in steps_rows)
    med["peak_rss_gb"] = json.loads((run_dir / "summary.json").read_text())["peak_rss_mb"] / 1024
    med["steps"] = len(steps_rows)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="RL steps per configuration (the first is dropped)")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    model = resolve_model_path("smollm2-135m-instruct")
    cpu = rundir.cpu_kind()
    print(f"SmolLM2-135M-Instruct (Q4_1, dequantized) on {cpu['cpu']} ({', '.join(cpu.get('cpu_features', []))}), "
          f"{os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            if precision == "bf16" and not bf16_is_fast(torch.device("cpu")):
                print("bf16: skipped, this CPU has no bf16 matrix units (it would be emulated)", flush=True)
                continue
            for mode in args.modes.split(","):
                med = measure(model, Path(tmp) / f"{mode}-{precision}", lora=mode == "lora",
                              bf16=precision == "bf16", steps=args.steps)
                results.append({"mode": mode, "precision": precision, **med})
                print(f"{mode} {precision}: {json.dumps({k: round(v, 3) for k, v in med.items()})}", flush=True)
    print("\n| policy | precision | generate s | score s | logprobs s | train s | step s | gen tokens/s | "
          "peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['precision']} | {r['generate']:.2f} | {r['score']:.3f} | {r['logprobs']:.2f} | "
              f"{r['train']:.2f} | {r['step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} |")
    print(f"\n8 prompts x 8 samples x up to 32 new tokens a step; medians over {results[0]['steps'] if results else 0} "
          "steps after the first; one process per row.")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
