"""The sharded learner's cost: memory per rank, step time and weight-sync time, world size 1 against N (CPU, gloo).

    python benchmarks/sharded_learner.py                          # tiny-25m, world sizes 1 and 2, 3 timed steps
    python benchmarks/sharded_learner.py --preset tiny-3m --steps 2 --world-sizes 1 2

Each world size runs as its own group of local rank processes (train/learner_group.py: world size 1 is a plain
Learner in a process of its own, so both sides pay the same process and import costs), on the same synthetic
RL-shaped batch: `--prompts` prompts x `--group` samples, prompts of `--prompt-len` tokens, completions of
`--completion-len`. The cores are split between the ranks (2 cores: 2 threads for world size 1, 1 each for 2), so
the comparison is at equal hardware. It prints, per world size:

  - s/step: median seconds of Learner.train_step (after one warm-up step), and its ratio to world size 1;
  - sync s: median seconds of LearnerGroup.weights() after an update (every unit gathered and streamed into the
    controller's full copy: issue 21's weight sync);
  - state MiB/rank: this rank's parameters + gradients + AdamW moments (what FSDP divides by N), and its ratio;
  - peak RSS MiB/rank, steps: the rank process's high-water resident memory during the steps and syncs (reset
    after building; includes torch itself, ~300 MiB, and the activations of a micro-batch, which FSDP does not
    divide); build: its high-water mark while the learner was built (rank 0 holds the full weights it broadcasts).

On CPU a second rank cannot make a step faster (the cores are shared, the collectives are extra work): what
sharding buys is memory per rank, which is what lets a model too large for one device train at all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def batch(prompts: int, group: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    from posttrain.train.learner import Sequences

    g = torch.Generator().manual_seed(seed)
    distinct = [torch.randint(4, vocab, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    rows = [p for p in distinct for _ in range(group)]
    completions = [torch.randint(4, vocab, (completion_len,), generator=g).tolist() for _ in rows]
    return Sequences(rows, completions)


def measure(preset: str, world_size: int, cores: int, args: argparse.Namespace) -> dict:
    from posttrain.models import load_model, resolve_model_path
    from posttrain.train.learner_group import LearnerSpec, LocalRanks, launch_group
    from posttrain.train.losses import SFTLoss

    policy = load_model(resolve_model_path(preset, seed=0)).float()
    seqs = batch(args.prompts, args.group, args.prompt_len, args.completion_len, policy.config.vocab_size)
    tokens = len(seqs) * args.completion_len
    learner_args = {"lr": 1e-4, "total_updates": args.steps + 1, "micro_batch_size": args.micro_batch_size,
                    "pad_id": 0, "bf16": args.bf16}
    threads = max(1, cores // world_size)
    with tempfile.TemporaryDirectory() as scratch:
        group = launch_group(policy, LearnerSpec(type(policy), policy.config, learner_args),
                             LocalRanks(world_size, threads=threads), scratch=Path(scratch) / "shards")
        try:
            build_peak = group.peak_memory()
            group.reset_peak_memory()
            steps, syncs = [], []
            for i in range(args.steps + 1):
                t0 = time.perf_counter()
                group.train_step(seqs, SFTLoss(tokens))
                step_s = time.perf_counter() - t0
                group.weights()
                if i:  # the first step warms up (allocator, thread pools)
                    steps.append(step_s)
                    syncs.append(group.last_sync_s)
            state = group.ranks.call_each("state_memory", [()] * world_size)
            peak = group.peak_memory()
        finally:
            group.close()
    per_rank = [s["params_mib"] + s["grads_mib"] + s["optimizer_mib"] for s in state]
    return {"world_size": world_size, "threads": threads, "step_s": statistics.median(steps),
            "sync_s": statistics.median(syncs), "state_mib": max(per_rank),
            "rss_mib": max(p["rss_mib"] for p in peak), "build_rss_mib": max(p["rss_mib"] for p in build_peak),
            "params": sum(p.numel() for p in policy.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-25m")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                    help="bf16 autocast in the ranks (default: fp32)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{args.preset}, {cores} cores, batch {args.prompts}x{args.group} rows of {args.prompt_len}+"
          f"{args.completion_len} tokens, micro-batches of {args.micro_batch_size}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.steps} timed steps")
    results = []
    for ws in args.world_sizes:
        results.append(measure(args.preset, ws, cores, args))
        r = results[-1]
        print(f"  world size {ws} done: {r['step_s']:.2f} s/step", flush=True)
    base = results[0]
    print(f"\n{base['params'] / 1e6:.1f}M parameters\n")
    print("| world size | threads/rank | s/step | vs first | sync s | state MiB/rank | vs first | "
          "peak RSS MiB/rank, steps | build |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['world_size']} | {r['threads']} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['sync_s']:.3f} | {r['state_mib']:.0f} | {r['state_mib'] / base['state_mib']:.2f}x | "
              f"{r['rss_mib']:.0f} | {r['build_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
