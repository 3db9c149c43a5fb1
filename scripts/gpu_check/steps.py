"""The GPU check's steps, each run in a process of its own by main.py (so a step that hangs or crashes costs only
itself, and each has its own timeout):

    python scripts/gpu_check/steps.py STEP SPEC.json      # SPEC: the step's arguments; writes SPEC["result"]

A step returns (numbers, detail): numbers are floats (finite, checked by main.py), detail one line of what ran.
A check that fails raises Failed after its numbers are recorded, so a failed step still reports what it measured.
Every step takes `device` ("cuda" on the GPU, "cpu" in the dry run) and sizes from its SPEC; main.py chooses them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
Numbers = dict[str, float]


class Failed(Exception):
    """A check failed; the numbers measured so far are still written."""


# ---------------------------------------------------------------------------------------------------------------
# (a) the engine contract: tests/rollout/test_engine_contract.py as it is, under pytest


def engine_contract(spec: dict, numbers: Numbers) -> str:
    """The contract tests (sampler logprobs equal the learner's before and after a weight sync, tied and untied;
    with vLLM also a LoRA policy whose adapters alone are synced). spec["vllm"]: the vLLM cases, else the local
    engine's. spec["model_device"]: where device_plugin.py puts the tests' models (so the learner and the local
    engine run there); vLLM runs on the GPU whatever it is, its learner stays on the CPU (see main.py)."""
    tests = "sampler_logprobs or lora_policy" if spec["vllm"] else "sampler_logprobs"
    junit = Path(spec["scratch"]) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "rollout" / "test_engine_contract.py"), "-q",
           "-p", "no:cacheprovider", "-p", "device_plugin", "-k", tests, "-m", "vllm" if spec["vllm"] else "not vllm",
           f"--junitxml={junit}"]
    env = {**os.environ, "GPU_CHECK_DEVICE": spec["model_device"]}
    rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase") if junit.exists() else []:
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["failed" if kind in ("failure", "error") else kind] += 1
        numbers[f"{case.get('name')}_s"] = float(case.get("time", "nan"))
    numbers.update({k: float(v) for k, v in counts.items()})
    if rc != 0 or counts["passed"] == 0 or counts["failed"]:
        raise Failed(f"pytest exit {rc}: {counts['passed']} passed, {counts['failed']} failed (see the log)")
    engine = "vLLM" if spec["vllm"] else "local engine"
    return f"{engine}: {counts['passed']} contract tests passed, models and learner on {spec['model_device']}"


# ---------------------------------------------------------------------------------------------------------------
# (b), (d) RL steps through posttrain.runner.run


def rl(spec: dict, numbers: Numbers) -> str:
    """The quickstart's [rl] section for spec["steps"] steps from spec["model"] (a preset or a HF directory), with
    spec["engine"] and spec["bf16"]. The reward is the `random` control (Bernoulli 0.5): from untrained weights
    the verifier rewards nothing, every group would be dropped and no update (or weight sync) would happen; with
    it every step trains, syncs the engine and measures the engine-learner mismatch."""
    from posttrain.config import read_toml, resolve_paths, set_path, validate
    from posttrain.runner import run

    raw = resolve_paths(read_toml(QUICKSTART, missing=f"{QUICKSTART}: not found"), QUICKSTART.parent)
    raw.pop("sft", None)  # a recipe may not carry the section of a stage it skips
    raw.update(recipe=["rl"], name=spec["name"], output_dir=spec["scratch"], threads=spec.get("threads"))
    sets = {"model.path": spec["model"], "model.bf16": spec["bf16"], "rollout.engine": spec["engine"],
            "env.reward": "random", "rl.steps": spec["steps"], "rl.eval_every": 0, "checkpoint.every": 0,
            "tracking.tensorboard": False, "eval.at_start": False, "eval.problems": spec["eval_problems"],
            "eval.samples": 2, "eval.ks": [1, 2], **spec.get("set", {})}
    for key, value in sets.items():
        set_path(raw, key.split("."), value)
    cfg = validate(raw, f"gpu_check {spec['name']}")
    t0 = time.perf_counter()
    summary = run(cfg, fresh=True)
    numbers["run_s"] = time.perf_counter() - t0
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]
    numbers["steps"] = float(len(steps))
    if len(steps) != spec["steps"]:
        raise Failed(f"{len(steps)} RL step rows in metrics.jsonl, expected {spec['steps']}")
    numbers["first_step_s"] = steps[0]["time/step_s"]
    timed = steps[1:] or steps  # the first step pays for warm-up (CUDA context, vLLM's first batch)
    for key in ("step", "generate", "logprob", "train", "weight_sync"):
        values = [r[f"time/{key}_s"] for r in timed if f"time/{key}_s" in r]
        if values:
            numbers[f"{key}_s_median"] = statistics.median(values)
    for key, reduce in (("is/mismatch_kl", max), ("is/logprob_diff_max", max), ("rollout/reward_mean", mean),
                        ("pg/loss", mean), ("perf/cuda_peak_mb", max), ("perf/peak_rss_mb", max)):
        values = [r[key] for r in steps if isinstance(r.get(key), int | float)]
        if values:
            numbers[key.replace("/", "_")] = float(reduce(values))
    bad = [r["step"] for r in steps if not all(math.isfinite(v) for v in r.values() if isinstance(v, float))]
    if bad:
        raise Failed(f"non-finite metrics at RL steps {bad}")
    import torch

    device = cfg.model.device if cfg.model.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    return (f"{spec['model']}, {len(steps)} RL steps, engine {spec['engine']}, {device}, {summary['precision']}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------
# (c) the sharded learner (FSDP2) at world size 1 on NCCL, its checkpoint reloaded on the CPU


def sharded(spec: dict, numbers: Numbers) -> str:
    """One process group of one rank (NCCL on a GPU, gloo on the CPU), the policy sharded with train/sharding.py,
    spec["steps"] updates beside a plain Learner on the same device (losses and gradient norms must agree),
    save_learner, then a plain Learner on the CPU without any process group loads that checkpoint: its weights
    must be the sharded learner's exactly, and its next step's loss the plain learner's."""
    import torch
    import torch.distributed as dist
    from sharded_learner import batch  # benchmarks/: the synthetic RL-shaped batch

    from posttrain.models import load_model, resolve_model_path
    from posttrain.train.learner import Learner
    from posttrain.train.losses import SFTLoss
    from posttrain.train.sharding import DataParallel, full_state_dict, load_learner, save_learner, shard

    device = torch.device(spec["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    scratch = Path(spec["scratch"])
    path = resolve_model_path(spec["model"], seed=0)
    policy = load_model(path).float()
    seqs = batch(spec["prompts"], spec["group"], 16, spec["completion_len"], policy.config.vocab_size)
    loss = SFTLoss(len(seqs) * spec["completion_len"])
    args = {"lr": 1e-3, "total_updates": spec["steps"] + 1, "micro_batch_size": spec["micro_batch_size"],
            "pad_id": 0}
    plain = Learner(load_model(path).float().to(device), **args)
    dist.init_process_group(backend, init_method=f"file://{scratch / 'rendezvous'}", rank=0, world_size=1)
    try:
        learner = Learner(shard(policy.to(device)), **args, data_parallel=DataParallel.current())
        step_s, loss_gap, norm_gap = [], 0.0, 0.0
        for _ in range(spec["steps"]):
            want = plain.train_step(seqs, loss)
            t0 = time.perf_counter()
            got = learner.train_step(seqs, loss)
            step_s.append(time.perf_counter() - t0)
            loss_gap = max(loss_gap, abs(got.loss - want.loss) / abs(want.loss))
            norm_gap = max(norm_gap, abs(got.grad_norm - want.grad_norm) / want.grad_norm)
        save_learner(learner, scratch / "shards")
        weights = {k: v.clone() for k, v in full_state_dict(learner.model).items()}
    finally:
        dist.destroy_process_group()
    numbers.update(sharded_step_s_median=statistics.median(step_s), loss_rel_gap=loss_gap, grad_norm_rel_gap=norm_gap,
                   params_m=sum(p.numel() for p in plain.model.parameters()) / 1e6)
    cpu = Learner(load_model(path).float(), **args)  # no process group: a plain learner on the CPU
    load_learner(cpu, scratch / "shards")
    state = cpu.model.state_dict()
    numbers["reload_max_abs_diff"] = max(float((state[k] - v.cpu()).abs().max()) for k, v in weights.items())
    numbers["reload_lr_step"] = float(cpu.scheduler.last_epoch)
    numbers["resumed_loss_rel_gap"] = abs(cpu.train_step(seqs, loss).loss - (w := plain.train_step(seqs, loss).loss)
                                          ) / abs(w)
    if loss_gap > 1e-4 or norm_gap > 1e-4:
        raise Failed(f"sharded and plain learners disagree: loss {loss_gap:.2e}, grad norm {norm_gap:.2e} (relative)")
    if numbers["reload_max_abs_diff"] != 0.0 or numbers["reload_lr_step"] != spec["steps"]:
        raise Failed(f"the checkpoint reloaded on the CPU differs: weights by {numbers['reload_max_abs_diff']:.2e}, "
                     f"scheduler at {numbers['reload_lr_step']:.0f} of {spec['steps']}")
    if numbers["resumed_loss_rel_gap"] > 1e-3:
        raise Failed(f"the reloaded CPU learner's next loss is off by {numbers['resumed_loss_rel_gap']:.2e}")
    return (f"{spec['model']}, {backend}, world size 1, {spec['steps']} updates, checkpoint reloaded on the CPU "
            f"(torch {torch.__version__})")


# ---------------------------------------------------------------------------------------------------------------
# (e) engine throughput: vLLM, the local engine and transformers' generate against the GEMM rate


class HFGenerate:
    """transformers' `generate` behind the engine interface that benchmarks/engine_throughput.timed calls: left
    padding, sampling at the given temperature, exactly max_new_tokens when ignore_eos (min_new_tokens)."""

    def __init__(self, model: Any, tokenizer: Any, dtype: Any) -> None:
        import copy

        self.model = copy.deepcopy(model).to(dtype).eval()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        import torch

        from posttrain.records import Completion

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        torch.manual_seed(params.seed)
        n = params.max_new_tokens
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature,
                                      top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n if params.ignore_eos else 0,
                                      pad_token_id=self.pad)
        return [Completion(prompt_ids=tuple(p), token_ids=tuple(row[width:].tolist()), logprobs=(), finish_reason="length",
                           text="", policy_version=0) for p, row in zip(prompts, out, strict=True)]

    def close(self) -> None:
        del self.model


def gemm_tflops(device: Any, dtype: Any, n: int) -> float:
    """The best of five n^3 matmuls (TFLOP/s), synchronised on a GPU."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def engine_throughput(spec: dict, numbers: Numbers) -> str:
    """benchmarks/engine_throughput.py's measurement (its `timed`, the ledger's FLOPs) on spec["device"]: distinct
    3-digit addition prompts, exactly max_new_tokens each, median of `repeats` calls after `warmup`; the rate as
    a share of the best matmul in the engines' precision (bf16 on a GPU). An engine that cannot start is a
    failed check after the others ran."""
    import itertools

    import torch
    from engine_throughput import timed  # benchmarks/

    from posttrain.data.prompts import render_prompt
    from posttrain.data.samplers import task_stream
    from posttrain.envs import make_env
    from posttrain.models import load_model, load_tokenizer, resolve_bf16, resolve_model_path
    from posttrain.rollout import build_engine
    from posttrain.tracking.ledger import FlopModel

    device = torch.device(spec["device"])
    bf16 = resolve_bf16(spec["bf16"], device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    path = resolve_model_path(spec["model"], seed=0)
    model, tok = load_model(path).to(device).eval(), load_tokenizer(path)
    flops = FlopModel.from_model(model)
    env = make_env("arithmetic", {"digits": 3})
    batches = spec["batches"]
    prompts = [list(render_prompt(tok, env.prompt(t))) for t in itertools.islice(task_stream(env, 0), max(batches))]
    gemm = gemm_tflops(device, dtype, spec["gemm_n"])
    numbers["gemm_tflops"] = gemm
    builders: dict[str, Callable[[], Any]] = {
        "local": lambda: build_engine("local", model, tok, weights="copy", bf16=bf16),
        "vllm": lambda: build_engine("vllm", model, tok, weights="copy", bf16=bf16),
        "hf_generate": lambda: HFGenerate(model, tok, dtype)}
    failures = []
    for name in spec["engines"]:
        try:
            engine = builders[name]()
        except Exception as e:  # noqa: BLE001 -- one engine that cannot start must not hide the others' numbers
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        try:
            for b in batches:
                seconds, lengths = timed(engine, prompts[:b], spec["max_new_tokens"], spec["warmup"], spec["repeats"],
                                         True)
                work = sum(flops.prefill(len(q)) + flops.decode_steps(len(q), n) for q, n in zip(prompts[:b], lengths))
                numbers[f"{name}_b{b}_tokens_per_s"] = sum(lengths) / seconds
                numbers[f"{name}_b{b}_gemm_pct"] = 100 * work / seconds / 1e12 / gemm
        finally:
            engine.close()
    numbers["gemm_tflops_end"] = gemm_tflops(device, dtype, spec["gemm_n"])
    if failures:
        raise Failed("; ".join(failures))
    return (f"{spec['model']} on {device.type}, {'bf16' if bf16 else 'fp32'}, batches {batches}, "
            f"{spec['max_new_tokens']} new tokens, GEMM {spec['gemm_n']}^3 {gemm:.1f} TFLOP/s; engines "
            f"{', '.join(spec['engines'])}")


# ---------------------------------------------------------------------------------------------------------------
# (f) time to a target against TRL: benchmarks/time_to_target.py as it is


def time_to_target(spec: dict, numbers: Numbers) -> str:
    """benchmarks/time_to_target.py --quick (seed 0, target pass@1 0.3, at most 20 RL steps, 50 problems) with
    posttrain's default contender and TRL's GRPOTrainer, from the quickstart's SFT stage. As that script is
    written, TRL runs with use_cpu=True and use_vllm=False; posttrain runs wherever model.device = auto puts it."""
    out = Path(spec["scratch"]) / "ttt.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_target.py"), "--quick", "--contenders", "default,trl",
           "--work-dir", str(Path(spec["scratch"]) / "ttt"), "--json", str(out), "--plot", ""]
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if rc or not out.exists():
        raise Failed(f"benchmarks/time_to_target.py exit {rc}")
    results = json.loads(out.read_text())["results"]
    for contender, seeds in results.items():
        r = seeds["0"]
        numbers[f"{contender}_final_pass1"] = r["points"][-1]["pass@1"]
        if r["time_to_target_s"] is not None:
            numbers[f"{contender}_time_to_target_s"] = r["time_to_target_s"]
            numbers[f"{contender}_steps_to_target"] = float(r["steps"])
    return "time_to_target.py --quick: posttrain default vs TRL GRPOTrainer (TRL on the CPU, without vLLM)"


STEPS: dict[str, Callable[[dict, Numbers], str]] = {
    "engine_contract": engine_contract, "rl": rl, "sharded": sharded, "engine_throughput": engine_throughput,
    "time_to_target": time_to_target}


def main() -> int:
    kind, spec_path = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    numbers: Numbers = {}
    result: dict[str, Any] = {"numbers": numbers, "detail": "", "error": None}
    try:
        result["detail"] = STEPS[kind](spec, numbers)
    except Failed as e:
        result["error"] = str(e)
    finally:  # also on an unexpected exception: its traceback goes to the log, the numbers so far to the result
        Path(spec["result"]).write_text(json.dumps(result))
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
