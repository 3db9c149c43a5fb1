"""Packed SFT against padded SFT (issue 43, item 5): s/step of the quickstart's SFT stage with `sft.pack_tokens`
unset (one example per row, padded: the engine's layout) and set to a few row sizes, in one run.

    python benchmarks/packed_sft.py                                  # the quickstart's SFT, 30 steps each
    python benchmarks/packed_sft.py --steps 20 --pack 64,256 --recipe recipes/smollm2/word-problems.toml

Each configuration is its own `posttrain run` of the recipe's `sft` stage alone (recipe = "sft", its other stages'
sections dropped, no periodic or early-stopping evaluation, no checkpoints), from the same seed, so the examples
and the starting weights are the same. The figure is the median `time/step_s` over the steps after the first, read from metrics.jsonl; the ratio is
unpacked / packed (above 1: packing is faster). The first step's `sft/loss` is printed beside it: packing changes
the layout, not the loss, so it must agree to float rounding (tests/train/test_packing.py holds it to 1e-6 in fp32;
under bf16 autocast the rounding differs with the layout). A recipe with no [sft] section (an RL recipe) gets an
SFT stage on its environment's gold answers with the defaults' batch of 128.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sft_recipe(recipe: Path, out: Path, steps: int, pack_tokens: int | None, threads: int) -> Path:
    """The recipe's SFT stage alone, as a recipe file: its other stages' sections dropped, no evaluation to
    speak of, no checkpoints."""
    from posttrain.config.load import read_toml, to_toml, validate
    from posttrain.stages import load_stages

    raw = read_toml(recipe, missing="recipe")
    stages = load_stages()
    raw = {k: v for k, v in raw.items() if k == "sft" or k not in stages}
    name = f"pack{pack_tokens or 0}"
    sft = {**raw.get("sft", {}), "steps": steps, "eval_every": 0, "pack_tokens": pack_tokens}
    sft.pop("stop_at_accuracy", None)
    raw.update(recipe="sft", name=name, output_dir=str(out), threads=threads, sft=sft,
               checkpoint={"every": 0}, eval={"problems": 1, "samples": 1, "ks": [1], "at_start": False})
    path = out / f"{name}.toml"
    path.write_text(to_toml(validate(raw, str(recipe))))
    return path


def measure(recipe: Path, out: Path, steps: int, pack_tokens: int | None, threads: int) -> dict[str, float]:
    path = sft_recipe(recipe, out, steps, pack_tokens, threads)
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path.name}: posttrain run failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / path.stem / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if "sft/loss" in r]
    return {"s_per_step": statistics.median(r["time/step_s"] for r in sft[1:]), "first_loss": sft[0]["sft/loss"],
            "steps": len(sft)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.toml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pack", default="32,64,128,256", help="comma-separated row sizes in tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [None, *(int(x) for x in args.pack.split(","))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            results[size or 0] = measure(args.recipe, Path(tmp), args.steps, size, args.threads)
            print(f"pack_tokens={size}: {results[size or 0]}", flush=True)
    base = results[0]["s_per_step"]
    print(f"\n{args.recipe.name}, SFT stage, {args.steps} steps, {args.threads} threads\n")
    print("| sft.pack_tokens | s/step | speed-up | first-step loss |\n|---|---|---|---|")
    for size, r in results.items():
        print(f"| {size or 'unset (padded)'} | {r['s_per_step']:.4f} | {base / r['s_per_step']:.2f}x | "
              f"{r['first_loss']:.6f} |")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
