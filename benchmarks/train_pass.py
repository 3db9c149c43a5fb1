"""The learner's training pass with and without shared prompt prefixes (train/forward.py), on CPU.

    python benchmarks/train_pass.py                  # the RL benchmark's shape and the quickstart's shape

One forward + backward of completion logprobs (bf16 autocast, eager attention, as in a run) over 16 prompts x 8
completions, each way, best of --repeats after one warm-up, alternating the two ways. Prints seconds, the ledger's
FLOPs of each way and the achieved rate, so what the shared prefix saves in FLOPs and in time are both visible.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def batch(prompt_len: int, completion_len: int, prompts: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps, cs = [], []
    for _ in range(prompts):
        p = torch.randint(5, 90, (prompt_len,), generator=g).tolist()
        for _ in range(group):
            ps.append(p)
            cs.append(torch.randint(5, 90, (completion_len,), generator=g).tolist())
    return ps, cs


def step(model, prompts: list, comps: list, share: bool) -> float:
    """One forward (logprobs + entropy, as the RL step computes) and backward; -> seconds."""
    from posttrain.train.forward import completion_logprobs, pack

    t0 = time.perf_counter()
    b = pack(prompts, comps, 0, share_prefixes=share)
    lp, _entropy = completion_logprobs(model, b, bf16=True, with_entropy=True)
    (-(lp * b.mask).sum() / b.mask.sum()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="tiny-25m:11:48,tiny-3m:11:48,tiny-3m:24:6",
                    help="model:prompt_tokens:completion_tokens, comma-separated")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    from posttrain.models import load_model, resolve_model_path
    from posttrain.tracking.ledger import FlopModel
    print("| model | prompt + completion tokens | plain s | shared s | time saved | plain GFLOP | shared GFLOP | "
          "plain GFLOP/s | shared GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        name, P, T = shape.split(":")
        P, T = int(P), int(T)
        model = load_model(resolve_model_path(name, seed=0), attention="eager")
        model.train()
        fm = FlopModel.from_model(model)
        prompts, comps = batch(P, T, 16, 8)

        times: dict[bool, list[float]] = {True: [], False: []}
        step(model, prompts, comps, False), step(model, prompts, comps, True)  # warm-up
        for _ in range(a.repeats):
            for share in (False, True):
                times[share].append(step(model, prompts, comps, share))
        plain_f = 128 * fm.train(P + T, (P + T + 1) / 2, logit_tokens=T)
        shared_f = 16 * fm.train_shared_prefix(P, [T] * 8)
        tp, ts = min(times[False]), min(times[True])
        print(f"| {name} | {P} + {T} | {tp:.3f} | {ts:.3f} | {100 * (1 - ts / tp):.0f}% | {plain_f / 1e9:.0f} | "
              f"{shared_f / 1e9:.0f} | {plain_f / tp / 1e9:.0f} | {shared_f / ts / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
