"""The pinned-metric regression: run tests/pinned/sft_rl_tiny.toml and compare every number it writes with the
checked-in tests/pinned/sft_rl_tiny.json, bit for bit.

    python scripts/pin_metrics.py            # check: exit 1 naming the first number that differs
    python scripts/pin_metrics.py --write    # regenerate, when a change is meant to alter the numbers

What is compared: metrics.jsonl less wall times, throughput and memory (`time/*`, `perf/*`), samples.jsonl, every
evaluation JSON and a hash of the final weights. Exact equality needs the same kernels: the run is fp32 on 2
threads with the CPU kernels capped at AVX2 (ATen's dispatch, oneDNN and MKL's reproducible AVX2 branch), so an
AVX2-only CPU and one with AVX-512 run the same instructions (docs/reliability.md, "Determinism").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "pinned" / "sft_rl_tiny.toml"
PINNED = RECIPE.with_suffix(".json")
# The kernels every machine kind can run the same way (see the module docstring).
KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT",
              "OMP_NUM_THREADS": "2"}


def run_recipe(out: Path) -> Path:
    """Run the pinned recipe in a fresh process with the capped kernels; -> its run directory."""
    env = {**os.environ, **KERNEL_ENV}
    env.pop("POSTTRAIN_BF16", None)  # the forced-precision passes of `make test` must not reach this run
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(RECIPE), "--set", f"output_dir={out}", "--fresh"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the pinned run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out / "pinned"


def numbers(run_dir: Path) -> dict:
    """Everything the run measured that must repeat, as JSON."""
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(run_dir / "final" / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return {
        "metrics": [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows],
        "samples": [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
        if (run_dir / "samples.jsonl").exists() else [],
        "evals": {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("time")}
                  for p in sorted((run_dir / "eval").glob("*.json"))},
        "final_weights_sha256": digest.hexdigest(),
    }


def first_difference(want: object, got: object, where: str = "") -> str | None:
    """The path of the first value that differs (dict keys, list indices), with both values."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in [*want, *(k for k in got if k not in want)]:
            if k not in want or k not in got:
                return f"{where}/{k}: {'missing' if k not in got else 'new'} ({want.get(k)!r} vs {got.get(k)!r})"
            d = first_difference(want[k], got[k], f"{where}/{k}")
            if d:
                return d
        return None
    if isinstance(want, list) and isinstance(got, list):
        for i, (a, b) in enumerate(zip(want, got)):
            d = first_difference(a, b, f"{where}[{i}]")
            if d:
                return d
        return None if len(want) == len(got) else f"{where}: {len(want)} items pinned, {len(got)} now"
    return None if want == got else f"{where}: pinned {want!r}, now {got!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate the pinned file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = numbers(run_recipe(Path(tmp)))
    if args.write:
        PINNED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {PINNED.relative_to(ROOT)} ({len(got['metrics'])} metric rows)")
        return
    diff = first_difference(json.loads(PINNED.read_text()), json.loads(json.dumps(got, sort_keys=True)))
    if diff:
        raise SystemExit(f"pinned metrics differ at {diff}\n(regenerate with `python scripts/pin_metrics.py "
                         "--write` only if the change is meant to alter them)")
    print(f"pinned metrics equal ({len(got['metrics'])} rows, final weights {got['final_weights_sha256'][:12]})")


if __name__ == "__main__":
    main()
