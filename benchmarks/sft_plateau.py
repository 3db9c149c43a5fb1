"""How many SFT steps the quickstart's model spends on its loss plateau, per seed, for an init std of tiny-3m.

    python benchmarks/sft_plateau.py                          # tiny-3m as shipped, seeds 0-4
    python benchmarks/sft_plateau.py --init-std 0.02          # the same with transformers' default init
    python benchmarks/sft_plateau.py --set sft.lr=5e-4        # any other lever, as `posttrain run --set`

The quickstart's SFT stage learns 3-digit addition in a sudden jump after a plateau whose length depends on the
seed, and it is most of the quickstart's wall time. This runs `recipes/quickstart.toml` reduced to its SFT stage,
evaluating held-out greedy accuracy every --eval-every steps (25: twice the quickstart's resolution), for each
seed in turn (never two at once), and prints the first step at which it reaches the recipe's stop_at_accuracy,
"not reached" where the --max-steps cap came first, and the seconds each run took. With --init-std the tiny-3m
preset is built at that std into the work directory (same seed, same draw order, so 0.06 gives the shipped
weights) and used in its place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provenance import commit, cpu_model
from time_to_target import stage_recipe

ROOT = Path(__file__).resolve().parent.parent
REACHED = re.compile(r"sft: accuracy reached [0-9.]+ at step (\d+)")


def preset_at(init_std: float, seed: int, work: Path) -> Path:
    """tiny-3m built at `init_std` (everything else as the shipped preset) into WORK/tiny-3m-std<X>-seed<S>."""
    from posttrain.models import presets

    out = work / f"tiny-3m-std{init_std:g}-seed{seed}"
    if not (out / "config.json").exists():
        presets.build_spec(dataclasses.replace(presets.PRESETS["tiny-3m"], init_std=init_std), seed, out)
    return out


def run_seed(recipe: Path, seed: int, model: Path | None, overrides: list[str]) -> dict[str, Any]:
    name = f"seed{seed}"
    sets = [f"seed={seed}", f"name={name}", *([f"model.path={model}"] if model else []), *overrides]
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--fresh"]
    cmd += [x for s in sets for x in ("--set", s)]
    print("  $ posttrain " + " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    if done.returncode:
        raise SystemExit(f"seed {seed} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    log = (recipe.parent / name / "run.log").read_text()
    accuracy = [float(x) for x in re.findall(r"held-out greedy accuracy ([0-9.]+)", log)]
    hit = REACHED.search(log)
    return {"seed": seed, "step": int(hit.group(1)) if hit else None, "seconds": seconds,
            "last_accuracy": accuracy[-1] if accuracy else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--init-std", type=float, default=None, help="build tiny-3m at this std (default: the preset)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-steps", type=int, default=700, help="cap per seed; past it: 'not reached'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more recipe overrides, as posttrain run --set (repeatable)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--work-dir", default="runs/sft-plateau")
    p.add_argument("--json", default=None, help="write the per-seed results here")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = (ROOT / a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = stage_recipe(a, work, "sft", sft={"eval_every": a.eval_every, "steps": a.max_steps},
                          checkpoint={"every": 0})
    arm = f"init std {a.init_std:g}" if a.init_std is not None else "tiny-3m as shipped"
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  commit {commit()}  {cpu_model()}  {arm}  "
          f"overrides {a.overrides or 'none'}  eval every {a.eval_every}  cap {a.max_steps}", flush=True)
    results = []
    for seed in (int(s) for s in a.seeds.split(",")):
        model = preset_at(a.init_std, seed, work) if a.init_std is not None else None
        r = run_seed(recipe, seed, model, a.overrides)
        results.append(r)
        when = (f"held-out greedy >= stop_at_accuracy at step {r['step']}" if r["step"] else
                f"not reached by step {a.max_steps} (held-out greedy {r['last_accuracy']} at the last evaluation)")
        print(f"seed {seed}: {when}; {r['seconds']:.0f} s", flush=True)
    steps = [r["step"] if r["step"] else float("inf") for r in results]
    print(f"{arm}: median step {statistics.median(steps):g} (not reached counts as infinite); "
          f"{sum(r['step'] is None for r in results)} of {len(results)} not reached; "
          f"{sum(r['seconds'] for r in results):.0f} s in all")
    if a.json:
        Path(a.json).write_text(json.dumps({"commit": commit(), "args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
