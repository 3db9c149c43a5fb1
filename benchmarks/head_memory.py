"""Peak memory of the learner's logprob pass with a large vocabulary: the model's own (B, T, V) logits against
the chunked head (train/forward.py CHUNKED_HEAD_MIN_VOCAB, algos/logprobs.py head_logprobs).

    python benchmarks/head_memory.py [--vocab 151936 --batch 32 --prompt 32 --completion 128]

Each path runs forward + backward in its own subprocess (so one's peak does not hide the other's) on a random
2-layer Llama with the given vocabulary, and prints the peak RSS growth, the time, and that both give the same
mean logprob. The ratio printed last is plain / chunked peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain.train import forward
from posttrain.train.forward import completion_logprobs, pack
a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=a["vocab"], hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
if a["path"] == "plain":
    forward.CHUNKED_HEAD_MIN_VOCAB = 1 << 62
assert (forward.chunked_head(model) is None) == (a["path"] == "plain")
prompts = [torch.randint(0, 1000, (a["prompt"],)).tolist() for _ in range(a["batch"])]
comps = [torch.randint(0, 1000, (a["completion"],)).tolist() for _ in range(a["batch"])]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
lp, _ = completion_logprobs(model, pack(prompts, comps, 0, share_prefixes=False))
lp.sum().backward()
print(json.dumps({"gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e6,
                  "s": time.perf_counter() - start, "lp_mean": lp.mean().item()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)  # Qwen2's
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--completion", type=int, default=128)
    args = vars(p.parse_args())
    results = {}
    for path in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**args, "path": path})],
                             capture_output=True, text=True, check=True)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[path]
        print(f"{path:8s} peak RSS growth {r['gb']:6.2f} GB   {r['s']:6.1f} s   mean logprob {r['lp_mean']:.6f}")
    same = abs(results["plain"]["lp_mean"] - results["chunked"]["lp_mean"]) < 1e-4
    print(f"same logprobs: {same}; memory ratio plain/chunked: {results['plain']['gb'] / results['chunked']['gb']:.1f}x")


if __name__ == "__main__":
    main()
