"""Run a recipe twice, the same way, and report the first number that differs (or that none does).

    python scripts/check_determinism.py recipes/quickstart.toml --set threads=2
    python scripts/check_determinism.py RECIPE --set model.bf16=false --keep /tmp/det   # keep both run dirs

Compared, as the pinned-metric test compares (scripts/pin_metrics.py): every metrics.jsonl row less wall times,
throughput and memory (`time/*`, `perf/*`), samples.jsonl, every evaluation JSON and a hash of the final weights.
The two runs are sequential, each in a fresh process with the same environment, so what differs is what the run
itself does differently: a difference names the first row and key (a step number), which is where to bisect.
docs/reliability.md ("Determinism") says what is expected to repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pin_metrics import first_difference, numbers


def run_once(recipe: str, overrides: list[str], out: Path) -> Path:
    cmd = [sys.executable, "-m", "posttrain.cli", "run", recipe, *[x for o in overrides for x in ("--set", o)],
           "--set", f"output_dir={out}", "--set", "name=check", "--fresh"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
    if done.returncode != 0:
        raise SystemExit(f"the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out / "check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="write the two runs under this directory (a/ and b/) and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        first = numbers(run_once(args.recipe, args.overrides, root / "a"))
        second = numbers(run_once(args.recipe, args.overrides, root / "b"))
    diff = first_difference(json.loads(json.dumps(first)), json.loads(json.dumps(second)))
    if diff:
        raise SystemExit(f"the two runs differ at {diff}")
    print(f"identical: {len(first['metrics'])} metric rows, {len(first['samples'])} samples, "
          f"{len(first['evals'])} evaluations, final weights {first['final_weights_sha256'][:12]}")


if __name__ == "__main__":
    main()
