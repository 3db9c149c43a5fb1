"""Rollout engine throughput against the machine's limit: tokens/s and the fraction of the dense matmul rate that
the local engine and the vLLM engine reach on the same weights, in one run.

    .venv-vllm/bin/python benchmarks/engine_throughput.py                  # local and vLLM (`make install-vllm`)
    .venv/bin/python benchmarks/engine_throughput.py --engines local       # the local engine only

What is measured, per batch size (default 64 and 256) and engine: `engine.generate` of `batch` distinct 3-digit
addition prompts (no shared prefixes, so prefix sharing and prefix caching buy nothing), exactly --max-new-tokens
new tokens each at temperature 1 (SamplingParams.ignore_eos: the batch stays full, so batch 64 means 64 rows in
every decode step and both engines do the same work; --natural stops at EOS as in a run, and each engine's token
count is then its own); --warmup untimed calls, then the median of --repeats timed calls. The weights are the preset's random initialisation (default
tiny-25m) in the precision a recipe's model.bf16 = "auto" picks here.

The limit: the best 2048^3 matmul in that precision with the same threads (provenance.gemm_gflops), measured
before and after. "% of GEMM" = the ledger's FLOPs for the work done (tracking/ledger.py FlopModel: per row,
prefill(prompt) + decode_steps(prompt, completion), attention included) / the call's seconds / the GEMM rate at
the start. "decode %" leaves the prefill out: (FLOPs of a call - FLOPs of its prefill) / (seconds of the call -
seconds of a max_new_tokens = 1 call on the same prompts), i.e. the single-token steps alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from provenance import commit, cpu_model, gemm_gflops


def timed(engine: Any, prompts: list[list[int]], max_new_tokens: int, warmup: int, repeats: int, ignore_eos: bool
          ) -> tuple[float, list[int]]:
    """-> (median seconds of a call, completion lengths of the last call)."""
    from posttrain.records import SamplingParams

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, ignore_eos=ignore_eos)

    for w in range(warmup):
        engine.generate(prompts, params(w))
    seconds, lengths = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params(100 + r))
        seconds.append(time.perf_counter() - t0)
        lengths = [len(c.token_ids) for c in outs]
    return statistics.median(seconds), lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-25m")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--engines", default="local,vllm")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--natural", action="store_true", help="stop at EOS (default: exactly --max-new-tokens)")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from posttrain.data.prompts import render_prompt
    from posttrain.data.samplers import task_stream
    from posttrain.envs import make_env
    from posttrain.models import load_model, load_tokenizer, resolve_bf16, resolve_model_path
    from posttrain.rollout import build_engine
    from posttrain.tracking.ledger import FlopModel

    cpu = torch.device("cpu")
    bf16 = resolve_bf16("auto", cpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    path = resolve_model_path(a.preset, seed=0)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    flops = FlopModel.from_model(model)
    env = make_env("arithmetic", {"digits": 3})
    batches = [int(b) for b in a.batches.split(",")]
    tasks = list(itertools.islice(task_stream(env, 0), max(batches)))
    prompts = [list(render_prompt(tok, env.prompt(t))) for t in tasks]
    gemm = gemm_gflops(dtype)
    precision = "bf16" if bf16 else "fp32"
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
            "preset": a.preset, "params": sum(p.numel() for p in model.parameters()), "gemm_gflops": gemm}
    print(f"{info['date']}  commit {info['commit']}  {info['cpu']}  {info['threads']} threads  torch {info['torch']}")
    print(f"{a.preset} ({info['params'] / 1e6:.1f}M parameters), {precision}; GEMM 2048^3 {precision} "
          f"{gemm:.0f} GFLOP/s; {'up to ' if a.natural else ''}{a.max_new_tokens} new tokens, distinct prompts, "
          f"median of {a.repeats}", flush=True)

    rows = []
    print("| engine | batch | tokens/s | ms per decode step | GFLOP/s | % of GEMM | decode % of GEMM |")
    print("|---|---|---|---|---|---|---|")
    for name in a.engines.split(","):
        try:
            engine = build_engine(name, model, tok, weights="copy", bf16=bf16)
        except Exception as e:  # noqa: BLE001 -- a missing optional engine is a line in the table, not a crash
            print(f"| {name} | - | not run: {e} | | | | |", flush=True)
            continue
        try:
            for batch in batches:
                batch_prompts = prompts[:batch]
                seconds, lengths = timed(engine, batch_prompts, a.max_new_tokens, a.warmup, a.repeats,
                                         not a.natural)
                prefill_s, _ = timed(engine, batch_prompts, 1, 1, a.repeats, True)
                prefill = sum(flops.prefill(len(q)) for q in batch_prompts)
                work = prefill + sum(flops.decode_steps(len(q), n) for q, n in zip(batch_prompts, lengths))
                tokens = sum(lengths)
                rate = work / seconds / 1e9
                decode_rate = (work - prefill) / max(seconds - prefill_s, 1e-9) / 1e9
                row = {"engine": name, "batch": batch, "tokens": tokens, "seconds": seconds,
                       "prefill_seconds": prefill_s, "flops": work, "tokens_per_s": tokens / seconds,
                       "ms_per_step": 1e3 * (seconds - prefill_s) / max(max(lengths) - 1, 1),
                       "gflops": rate, "gemm_frac": rate / gemm, "decode_gemm_frac": decode_rate / gemm}
                rows.append(row)
                print(f"| {name} | {batch} | {row['tokens_per_s']:,.0f} | {row['ms_per_step']:.1f} | {rate:.1f} | "
                      f"{100 * row['gemm_frac']:.1f}% | {100 * row['decode_gemm_frac']:.1f}% |", flush=True)
        finally:
            engine.close()
    end = gemm_gflops(dtype)
    print(f"GEMM at the end: {end:.0f} GFLOP/s ({precision})")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "gemm_gflops_end": end, "args": vars(a), "rows": rows},
                                           indent=1))


if __name__ == "__main__":
    main()
