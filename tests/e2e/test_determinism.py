"""Bit-repeatable runs on CPU: the same commit, recipe, seed, CPU kind and thread count give identical
metrics.jsonl, samples and final weights (docs/reliability.md, "Determinism"). Two threads, as a user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import validate
from posttrain.runner import run


def recipe(tmp_path, name: str, bf16: bool, **rollout) -> object:
    return validate({
        "recipe": "rl", "name": name, "output_dir": str(tmp_path), "seed": 3, "threads": 2,
        "model": {"path": "tiny-test", "bf16": bf16}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "rl": {"steps": 60, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "eval_every": 30},
        "rollout": rollout,
        "eval": {"problems": 8, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
        "checkpoint": {"every": 20, "keep_last_n": 1},
    }, "test")


def numbers(run_dir) -> list[dict]:
    """metrics.jsonl without the machine-dependent figures (wall times, throughput, memory)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


# Each case pins its precision (a forced POSTTRAIN_BF16 would override the recipe). Asynchronous RL in bf16 autocast
# is not among them: its learner trains while the engine's thread generates, and on 2026-12-07 one of four such
# pairs differed in the 6th digit of a step's grad norm (docs/reliability.md, "What does not repeat").
@pytest.mark.parametrize(("rollout", "bf16"), [({}, False), ({}, True), ({"max_staleness": 1}, False)],
                         ids=["sync-fp32", "sync-bf16", "async-fp32"])
def test_a_60_step_rl_run_repeats_bit_for_bit(tmp_path, monkeypatch, rollout, bf16):
    monkeypatch.delenv("POSTTRAIN_BF16", raising=False)
    a, b = recipe(tmp_path, "a", bf16, **rollout), recipe(tmp_path, "b", bf16, **rollout)
    run(a)
    run(b)
    rows_a, rows_b = numbers(a.run_dir), numbers(b.run_dir)
    assert len([r for r in rows_a if "pg/loss" in r or "train/skipped_frac" in r]) == 60
    first = next((i for i, (x, y) in enumerate(zip(rows_a, rows_b)) if x != y), None)
    assert first is None and len(rows_a) == len(rows_b), (
        f"first differing row {first}: {rows_a[first] if first is not None else ''} vs "
        f"{rows_b[first] if first is not None else ''}")
    assert (a.run_dir / "samples.jsonl").read_bytes() == (b.run_dir / "samples.jsonl").read_bytes()
    wa, wb = load_file(a.run_dir / "final" / "model.safetensors"), load_file(b.run_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fp32_batched_products_give_the_same_bits_at_any_memory_alignment_once_posttrain_is_imported():
    """The cause of the long-run drift (posttrain/kernels.py): MKL's fp32 batched GEMM rounded by the alignment
    of its operands, so two processes' engines gave logprobs differing in the last bit at some late step. A fresh
    process that imports posttrain (as `posttrain run` does) gets alignment-independent products, MKL_CBWR unset
    or not; the runner would otherwise write a warning to run.log."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import posttrain.kernels as k; print(k.alignment_sensitive())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
