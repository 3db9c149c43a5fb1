"""Scale-out speed, measured in one run: the vLLM engine against the local engine, and asynchronous RL against
synchronous RL at the same recipe.

    .venv-vllm/bin/python benchmarks/scale_out.py                 # both parts (needs vllm: `make install-vllm`)
    .venv/bin/python benchmarks/scale_out.py --parts async        # the async part only (no vLLM needed)

Part "engines": rollout tokens/s of `rollout.engine = "vllm"` vs "local" on the same weights (a preset, default
tiny-25m, fp32 on CPU), at each batch size (default 64 and 256 completions of 8 distinct prompts x group), after
`--warmup` untimed calls (vLLM's first calls are slow). Both engines sample the same prompts with the same
SamplingParams; completions stop at EOS or max_new_tokens, so each engine's token count is its own (printed).

Part "async": the quickstart's RL stage (recipes/async/staleness.toml) for `--steps` steps from the preset's random
weights (rewards near 0, so the step is generation and training of near-fixed length), with
rollout.max_staleness = 0, 1, 2: steps/s of each and the ratio to synchronous, and per phase the time spent
generating (producer) and training (learner), so the overlap is visible: with k > 0 a step costs about
max(generate, train) instead of generate + train when there are cores for both. On 2 CPU cores both phases want
both cores, so expect little gain here; the number is what it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def engines(preset: str, batches: list[int], max_new_tokens: int, warmup: int, repeats: int) -> None:
    import torch

    from posttrain.data.prompts import render_prompt
    from posttrain.models import load_model, load_tokenizer, resolve_model_path
    from posttrain.records import SamplingParams
    from posttrain.rollout import build_engine

    path = resolve_model_path(preset, seed=0)
    model, tok = load_model(path).float().eval(), load_tokenizer(path)
    questions = [f"{100 + 37 * i}+{200 + 11 * i}=" for i in range(8)]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    print(f"\n## engines: {preset}, fp32, {torch.get_num_threads()} threads, max_new_tokens {max_new_tokens}")
    print("| batch | local tok/s | vllm tok/s | vllm / local |")
    print("|---|---|---|---|")
    built = {name: build_engine(name, model, tok, weights="copy") for name in ("local", "vllm")}
    try:
        for batch in batches:
            group = batch // len(prompts)
            flat = [p for p in prompts for _ in range(group)]
            rates = {}
            for name, engine in built.items():
                for w in range(warmup):
                    engine.generate(flat, SamplingParams(max_new_tokens=max_new_tokens, seed=w))
                measured = []
                for r in range(repeats):
                    t0 = time.perf_counter()
                    outs = engine.generate(flat, SamplingParams(max_new_tokens=max_new_tokens, seed=100 + r))
                    measured.append(sum(len(c.token_ids) for c in outs) / (time.perf_counter() - t0))
                rates[name] = statistics.median(measured)
            print(f"| {batch} | {rates['local']:,.0f} | {rates['vllm']:,.0f} | {rates['vllm'] / rates['local']:.2f} |",
                  flush=True)
    finally:
        for engine in built.values():
            engine.close()


def async_rl(preset: str, steps: int, ks: list[int], out: Path) -> None:
    from posttrain.config import load_recipe
    from posttrain.runner import run

    print(f"\n## async RL: recipes/async/staleness.toml for {steps} steps on {preset} (random weights), local engine")
    print("| max_staleness | s/step | steps/s vs sync | generate s/step | train s/step | staleness mean |")
    print("|---|---|---|---|---|---|")
    base = None
    for k in ks:
        cfg = load_recipe(Path("recipes/async/staleness.toml"), [
            f"name=async-k{k}", f"output_dir={out}", f"model.path={preset}", f"rl.steps={steps}",
            "rl.eval_every=0", "eval.at_start=false", "eval.problems=8", f"rollout.max_staleness={k}",
            "rl.group_filter=none", "rl.skip_zero_advantage=false"])
        run(cfg, fresh=True)
        rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r][1:]  # drop the first step
        step_s = statistics.mean(r["time/step_s"] for r in train)
        gen_s = statistics.mean(r["time/generate_s"] for r in train)
        train_s = statistics.mean(r.get("time/train_s", 0.0) for r in train)
        lag = statistics.mean(r["rollout/staleness_mean"] for r in train)
        base = base or step_s
        print(f"| {k} | {step_s:.3f} | {base / step_s:.2f} | {gen_s:.3f} | {train_s:.3f} | {lag:.2f} |", flush=True)
    print("(generate s/step under k > 0 is the time the learner waited for the producer's batch, not the "
          "producer's own generation time)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="engines,async")
    ap.add_argument("--preset", default="tiny-25m")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--async-preset", default="tiny-3m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ks", default="0,1,2")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = args.parts.split(",")
    if "engines" in parts:
        engines(args.preset, [int(b) for b in args.batches.split(",")], args.max_new_tokens, args.warmup,
                args.repeats)
    if "async" in parts:
        with tempfile.TemporaryDirectory() as out:
            async_rl(args.async_preset, args.steps, [int(k) for k in args.ks.split(",")], Path(out))


if __name__ == "__main__":
    main()
