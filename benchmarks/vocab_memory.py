"""Peak memory of one RL update with a 150k vocabulary: does it follow micro-batch tokens, not vocabulary x tokens?

    python benchmarks/vocab_memory.py                 # ~18 minutes on 2 CPU cores (five configurations)
    python benchmarks/vocab_memory.py --budgets 2048 --full-logits-budgets 2048   # the default, both paths

The model is the tiny-25m architecture (8 layers, width 512) with Qwen2's vocabulary size (151,936; tied
embeddings, 101M parameters of which 78M the embedding). The batch is the RL defaults' shape: 32 prompts x 8
samples, 24 prompt + 32 completion tokens (256 x 56 = 14,336 tokens). Each configuration runs in its own
subprocess: old-policy logprobs (no grad), then one Learner.train_step (forward, backward, AdamW), and reports
its peak RSS. Configurations: the default chunked head at several `micro_batch_tokens` budgets, and the model's
own full logits (the path before the chunked head) at the default budget (2048 on CPU; at 16384 the full-logits
path was killed for memory on a 24 GB machine). Printed last: the ratio of the full-
logits peak to the chunked peak at the default budget, and bytes per micro-batch token from the budget sweep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from posttrain.train import forward
from posttrain.train.learner import Learner, Sequences
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, hidden_size=512, intermediate_size=1536,
                                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                     tie_word_embeddings=True))
if not a["chunked"]:
    forward.CHUNKED_HEAD_MIN_VOCAB = 1 << 62
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, 150_000, (24,), generator=g).tolist() for _ in range(32) for _ in range(8)]
comps = [torch.randint(0, 150_000, (32,), generator=g).tolist() for _ in range(256)]
seqs = Sequences(prompts, comps)
learner = Learner(model, lr=1e-4, total_updates=1, micro_batch_size=256, pad_id=0,
                  micro_batch_tokens=a["budget"])
start = time.perf_counter()
old, _ = learner.logprobs(seqs)
tokens = sum(len(c) for c in comps)
def loss_fn(out):
    return -(out.logprobs * out.mask).sum() / tokens, {}
result = learner.train_step(seqs, loss_fn)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_gb": peak / 1e9, "s": time.perf_counter() - start, "loss": result.loss,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def measure(budget: int, chunked: bool, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"budget": budget, "chunked": chunked,
                                                                   "threads": threads})],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="2048,4096,8192,16384", help="micro_batch_tokens values, comma-separated")
    p.add_argument("--full-logits-budgets", default="2048", help="the same for the full-logits path ('' = none)")
    p.add_argument("--default", type=int, default=2048, help="micro_batch_tokens = auto on CPU")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    for name, chunked, budgets in (("chunked head", True, args.budgets), ("full logits", False,
                                                                           args.full_logits_budgets)):
        for budget in [int(b) for b in budgets.split(",") if b]:
            rows.append((name, budget, measure(budget, chunked, args.threads)))
            print(f"{name:13s} micro_batch_tokens {budget:6d}: {fmt(rows[-1][2])}", flush=True)
    ok = [(b, r["peak_gb"]) for name, b, r in rows if name == "chunked head" and "peak_gb" in r]
    if len(ok) >= 2:
        (b0, m0), (b1, m1) = ok[0], ok[-1]
        print(f"chunked head: {(m1 - m0) * 1e9 / (b1 - b0) / 1e3:.0f} kB per micro-batch token "
              f"(peak {m0:.2f} GB at {b0} tokens -> {m1:.2f} GB at {b1})")
    chunked = {b: r for name, b, r in rows if name == "chunked head"}.get(args.default, {})
    full = {b: r for name, b, r in rows if name == "full logits"}.get(args.default, {})
    if "peak_gb" in chunked and "peak_gb" in full:
        print(f"full logits / chunked head peak at micro_batch_tokens={args.default}: "
              f"{full['peak_gb'] / chunked['peak_gb']:.2f}x")


def fmt(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return f"peak RSS {r['peak_gb']:5.2f} GB, {r['s']:5.1f} s, loss {r['loss']:.4f} ({r['params_m']:.0f}M params)"


if __name__ == "__main__":
    main()
