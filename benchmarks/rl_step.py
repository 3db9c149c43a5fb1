"""RL step speed: posttrain's RL stage against TRL's GRPOTrainer on identical weights, task and batch (CPU).

    python benchmarks/rl_step.py                                   # tiny-3m and tiny-25m, bf16, both length modes
    python benchmarks/rl_step.py --models tiny-3m --steps 2 --warmup 1 --no-bf16 --modes fixed   # a quick look

What it does, per model preset (same local HF dir for both frameworks: `resolve_model_path(name, seed=0)`):
  1. measures the machine's GEMM rate (2048^3 matmul, fp32 and bf16, best of a few) -- the ceiling below;
  2. alternates A/B rounds in one process: posttrain `run(cfg)` for warmup+k steps, then TRL `GRPOTrainer` for
     warmup+k steps, `--rounds` times, so load drift hits both; warm-up steps of every round are dropped;
  3. reads posttrain's per-phase times and FLOPs (metrics.jsonl: time/*, compute/*) and prints each phase's
     achieved FLOP rate as a fraction of the GEMM rate, plus raw KV-cache decode throughput of posttrain's engine;
  4. prints one table: model | posttrain s/step | TRL s/step | speed-up | gen % of GEMM | train % of GEMM.

Two length modes: "natural" (sampling stops at EOS; posttrain drops finished rows, HF generate pads them) and
"fixed" (EOS disabled in both, every completion exactly max_new_tokens long, so the comparison does not depend
on when EOS happens to be sampled). posttrain has no ignore-EOS option, so "fixed" empties the engine's
`eos_ids` from here; TRL gets `min_new_tokens = max_new_tokens`.

Semantics matched to TRL 1.16 GRPOConfig defaults (loss_type="dapo", scale_rewards="group", epsilon=0.2,
epsilon_high=None, beta=0.0, num_iterations=1, importance_sampling_level="token", no vLLM so no IS correction):
posttrain [rl] advantage="grpo" (eps=1e-4 as TRL), policy_loss="ppo_clip" (eps_low=eps_high=0.2),
aggregation="token_mean" (DAPO: sum over tokens / tokens in the whole step), kl_coef=0, group_filter="none",
mini_batches=epochs=1, recompute_old_logprobs=false (TRL uses the detached current logprobs as old ones when
num_iterations=1: no extra pass in either). Optimizer: AdamW lr 1e-4, betas (0.9, 0.999), no weight decay,
constant lr, grad clip 1.0 in both. TRL's default gradient_checkpointing=True is turned off (posttrain does not
recompute activations); --trl-gradient-checkpointing turns it back on. TRL's model is loaded with the attention
kernel posttrain picks on CPU (eager; --trl-attention sdpa gives HF's default). posttrain's skip_zero_advantage
(skip the forward/backward of samples with advantage exactly 0) is turned off, because with the random weights
used here every reward is 0 and it would skip all training; --posttrain-skip-zero-adv keeps it.

Weights are the preset's random initialisation (rewards are ~all 0): a speed benchmark, not a learning one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from provenance import commit, cpu_model, gemm_gflops

STEP_KEYS = ("time/generate_s", "time/logprob_s", "time/train_s", "time/step_s")
FLOP_KEYS = ("compute/generate_flops", "compute/train_flops", "compute/ref_flops", "compute/old_flops",
             "rollout/tokens", "train/tokens")


# ---------------------------------------------------------------------------------------------------------------
# posttrain side


@contextlib.contextmanager
def engine_without_eos(enabled: bool):
    """Make every LocalEngine built inside the block ignore EOS, so each completion has max_new_tokens tokens."""
    from posttrain.rollout.local import LocalEngine

    original = LocalEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.eos_ids = torch.empty(0, dtype=torch.long)

    if enabled:
        LocalEngine.__init__ = init
    try:
        yield
    finally:
        LocalEngine.__init__ = original


def posttrain_round(a, model: str, steps: int, out_dir: Path, tag: str, fixed: bool) -> list[dict]:
    from rich.console import Console

    from posttrain.config import validate
    from posttrain.runner import run

    # posttrain skips the forward/backward of zero-advantage samples (exactly zero gradient). With the random
    # initial weights here every reward is 0, so it would skip all training: off by default for like-for-like work.
    skip = {"skip_zero_advantage": a.posttrain_skip_zero_adv}
    cfg = validate({
        "recipe": "rl", "name": tag, "output_dir": str(out_dir), "seed": 0, "threads": a.threads,
        "model": {"path": model, "bf16": a.bf16, **({"compile": True} if a.compile else {})},
        "env": {"name": "arithmetic", "args": {"digits": 3}},
        "rl": {"steps": steps, "prompts_per_step": a.prompts, "group_size": a.group, "max_new_tokens": a.max_new_tokens,
               "temperature": 1.0, "lr": a.lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0,
               "schedule": "constant", "warmup_steps": 0, "advantage": "grpo", "advantage_args": {"eps": 1e-4},
               "policy_loss": "ppo_clip", "policy_loss_args": {"eps_low": 0.2, "eps_high": 0.2},
               "aggregation": "token_mean",
               "kl_coef": 0.0, "group_filter": "none", "mini_batches": 1, "epochs": 1,
               "micro_batch_size": a.prompts * a.group, "recompute_old_logprobs": False, **skip},
        "eval": {"at_start": False, "problems": 1, "samples": 1, "ks": [1], "max_new_tokens": 4},
        "checkpoint": {"every": 0},
    }, "bench")
    with engine_without_eos(fixed):
        run(cfg, fresh=True, console=Console(stderr=True, quiet=True))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("stage") == "rl" and "time/step_s" in r]
    out, prev = [], {}
    for r in rows:  # compute/* and token counters are cumulative: per-step values are differences
        step = {k: r.get(k, 0.0) for k in STEP_KEYS}
        step.update({k: r.get(k, 0.0) - prev.get(k, 0.0) for k in FLOP_KEYS})
        step["wall_s"] = r["time/elapsed_s"] - prev.get("time/elapsed_s", r["time/elapsed_s"] - r["time/step_s"])
        step["len_mean"] = r.get("rollout/len_mean", 0.0)
        step["clip_frac"] = r.get("pg/clip_frac", 0.0)
        out.append(step)
        prev = r
    return out


# ---------------------------------------------------------------------------------------------------------------
# TRL side

def attention_kwargs(choice: str) -> dict:
    """'same': the attention kernel posttrain itself picks on this device (eager on CPU), so kernels are equal."""
    if choice == "same":
        try:
            from posttrain.models import attention_for
        except ImportError:  # older posttrain: HF's default
            return {}
        choice = attention_for(torch.device("cpu"), "auto")
    return {"attn_implementation": choice}


_PHASES: list[tuple[str, float]] = []  # (profiled block, seconds) since the last TRL step ended


def _record_profiling() -> None:
    """TRL times its blocks (generate, rewards, compute_loss) but only reports them to wandb/mlflow: keep them."""
    from trl.extras.profiling import ProfilingContext

    def log(self, duration: float) -> None:
        _PHASES.append((self.name.split(".", 1)[-1], duration))

    ProfilingContext._log_metrics = log


def trl_round(a, model_dir: Path, tasks: list, steps: int, out_dir: Path, fixed: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.envs import make_env

    env = make_env("arithmetic", {"digits": 3})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **attention_kwargs(a.trl_attention))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": env.prompt(t), "task_index": i} for i, t in enumerate(tasks[: steps * a.prompts])]

    def reward(completions, task_index, **_) -> list[float]:
        return [env.score(tasks[i], c[-1]["content"]).reward for c, i in zip(completions, task_index)]

    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=a.bf16, seed=0, max_steps=steps,
        per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1, num_generations=a.group,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, use_vllm=False,
        generation_kwargs={"min_new_tokens": a.max_new_tokens} if fixed else None,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.999,
        max_grad_norm=1.0, gradient_checkpointing=a.trl_gradient_checkpointing, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, torch_compile=a.compile,
    )
    records: list[dict] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.last_end = time.perf_counter()

        def on_step_begin(self, *_, **__):
            _PHASES.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            phases: dict[str, float] = {}
            for name, s in _PHASES:
                phases[name] = phases.get(name, 0.0) + s
            records.append({"time/step_s": now - self.t0, "wall_s": now - self.last_end, **phases})
            self.last_end = now

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts: we print our own summary
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for r, h in zip(records, logs):
        r["len_mean"] = h["completions/mean_length"]
    return records


# ---------------------------------------------------------------------------------------------------------------
# Raw decode throughput of posttrain's engine (no RL around it)


def decode_tokens_per_s(model_dir: Path, tasks: list, batch: int, new_tokens: int, bf16: bool,
                        repeats: int = 3) -> float:
    from posttrain.data.prompts import render_prompt
    from posttrain.envs import make_env
    from posttrain.models import load_model, load_tokenizer
    from posttrain.records import SamplingParams
    from posttrain.rollout.local import LocalEngine

    env = make_env("arithmetic", {"digits": 3})
    model = load_model(model_dir, **{k.replace("attn_implementation", "attention"): v
                                      for k, v in attention_kwargs("same").items()})
    tok = load_tokenizer(model_dir)
    engine = LocalEngine(model, tok, bf16=bf16)
    engine.eos_ids = torch.empty(0, dtype=torch.long)  # fixed length: the batch stays full for every token
    prompts = [render_prompt(tok, env.prompt(t)) for t in tasks[:batch]]
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    engine.generate(prompts, params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best


# ---------------------------------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    import transformers
    import trl

    cpu, code = cpu_model(), commit()
    return {"code": code, "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "load": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def bench_model(a, name: str, mode: str, gemm: float, out_dir: Path, n_params: int) -> dict:
    from posttrain.data.samplers import task_stream
    from posttrain.envs import make_env
    from posttrain.models import resolve_model_path

    model_dir = resolve_model_path(name, seed=0)  # a preset name or a local checkpoint directory
    label = model_dir.name if name not in ("tiny-test", "tiny-3m", "tiny-25m") else name
    model_path = str(model_dir.resolve()) if label != name else name
    fixed = mode == "fixed"
    per_round = max(1, round(a.steps / a.rounds))
    steps = a.warmup + per_round
    # TRL's dataset = the first prompts of posttrain's own task stream, in the same order.
    tasks = [t for t, _ in zip(task_stream(make_env("arithmetic", {"digits": 3}), 0), range(steps * a.prompts))]
    pt, tr = [], []
    for r in range(a.rounds):
        t0 = time.time()
        pt += posttrain_round(a, model_path, steps, out_dir, f"pt-{label}-{mode}-r{r}", fixed)[a.warmup:]
        t1 = time.time()
        torch.set_num_threads(a.threads)
        tr += trl_round(a, model_dir, tasks, steps, out_dir / f"trl-{label}-{mode}-r{r}", fixed)[a.warmup:]
        torch.set_num_threads(a.threads)
        print(f"  {name} {mode} round {r + 1}/{a.rounds}: posttrain {t1 - t0:.0f}s, "
              f"TRL {time.time() - t1:.0f}s (incl. warm-up and setup)", flush=True)
    res = {"model": name, "mode": mode, "posttrain_steps": pt, "trl_steps": tr}
    for k in STEP_KEYS:
        res["pt_" + k] = med([s[k] for s in pt])
    res["pt_wall_s"] = med([s["wall_s"] for s in pt])
    res["trl_step_s"] = med([s["time/step_s"] for s in tr])
    res["trl_wall_s"] = med([s["wall_s"] for s in tr])
    res["trl_generate_s"] = med([s.get("transformers.generate", 0.0) for s in tr])
    res["trl_prepare_s"] = med([s.get("_prepare_inputs", 0.0) for s in tr])
    res["trl_loss_s"] = med([s.get("compute_loss", 0.0) for s in tr])
    res["trl_train_s"] = med([s["time/step_s"] - s.get("_prepare_inputs", 0.0) for s in tr])
    res["pt_len"] = med([s["len_mean"] for s in pt])
    res["pt_clip_frac"] = med([s["clip_frac"] for s in pt])
    res["trl_len"] = med([s.get("len_mean", float("nan")) for s in tr])
    # achieved FLOP rates per phase, from posttrain's own ledger
    # 2N / 6N per token only if this posttrain version does not log its compute ledger
    gen_rate = med([(s["compute/generate_flops"] or 2 * n_params * s["rollout/tokens"]) / s["time/generate_s"]
                    for s in pt])
    train_rate = med([(s["compute/train_flops"] or 6 * n_params * s["rollout/tokens"]) / s["time/train_s"]
                      for s in pt])
    lp_flops = med([s["compute/ref_flops"] + s["compute/old_flops"] for s in pt])
    # The roofline: posttrain's whole step (its ledger's FLOPs) at 100% of the measured GEMM rate. No kernel work
    # can make this step faster, so TRL s/step / floor_s is the largest speed-up reachable without doing less work.
    floor = med([(s["compute/generate_flops"] + s["compute/train_flops"] + s["compute/ref_flops"]
                  + s["compute/old_flops"]) / (gemm * 1e9) for s in pt])
    res.update(floor_s=floor, max_speedup=res["trl_step_s"] / floor if floor else float("nan"))
    res.update(gen_gflops=gen_rate / 1e9, train_gflops=train_rate / 1e9, gen_frac=gen_rate / 1e9 / gemm,
               train_frac=train_rate / 1e9 / gemm, logprob_flops=lp_flops,
               gen_tokens=med([s["rollout/tokens"] for s in pt]), train_tokens=med([s["train/tokens"] for s in pt]))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny-3m,tiny-25m",
                   help="presets or local checkpoint dirs, e.g. runs/scaling-sft/final (a policy that earns rewards)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per framework (split over --rounds)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every round")
    p.add_argument("--rounds", type=int, default=2, help="A/B alternations (posttrain then TRL) per model and mode")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--modes", default="natural,fixed", help="natural (stop at EOS), fixed (EOS disabled)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (off here)")
    p.add_argument("--trl-attention", default="same", help="same (posttrain's choice: eager on CPU), sdpa, eager")
    p.add_argument("--posttrain-skip-zero-adv", action="store_true",
                   help="keep posttrain's default skip of zero-advantage samples (with random weights: all of them)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile in both: posttrain model.compile (the learner) and TRL's torch_compile; the "
                        "compilation falls in the warm-up steps")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    a = p.parse_args()

    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(a.threads)
    _record_profiling()
    from posttrain.data.samplers import task_stream
    from posttrain.envs import make_env
    from posttrain.models import load_model, resolve_model_path

    info = machine()
    print(f"{info['date']}  posttrain {info['code']}  {info['cpu']}  threads={info['threads']}  torch {info['torch']}  "
          f"transformers {info['transformers']}  trl {info['trl']}  load avg {info['load'][0]:.2f}", flush=True)
    gemm = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    ceiling = gemm["bf16" if a.bf16 else "fp32"]
    print(f"GEMM 2048^3: fp32 {gemm['fp32']:.0f} GFLOP/s, bf16 {gemm['bf16']:.0f} GFLOP/s "
          f"(ceiling used: {'bf16' if a.bf16 else 'fp32'})", flush=True)

    results, decode = [], {}
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        for name in a.models.split(","):
            n_params = sum(p.numel() for p in load_model(resolve_model_path(name, seed=0)).parameters())
            for mode in a.modes.split(","):
                res = bench_model(a, name, mode, ceiling, Path(tmp), n_params)
                res["n_params"] = n_params
                results.append(res)
                print(f"{name} [{mode}] ({n_params / 1e6:.1f}M params): posttrain {res['pt_time/step_s']:.3f} s/step "
                      f"(generate {res['pt_time/generate_s']:.3f}, logprob {res['pt_time/logprob_s']:.3f}, "
                      f"train {res['pt_time/train_s']:.3f}; wall between steps {res['pt_wall_s']:.3f}; "
                      f"mean completion {res['pt_len']:.1f} tok) | TRL {res['trl_step_s']:.3f} s/step "
                      f"(generate {res['trl_generate_s']:.3f}, generate+score+advantages {res['trl_prepare_s']:.3f}, "
                      f"loss+backward+optimizer {res['trl_train_s']:.3f} of which compute_loss {res['trl_loss_s']:.3f}; wall {res['trl_wall_s']:.3f}; mean completion "
                      f"{res['trl_len']:.1f} tok)", flush=True)
                print(f"  posttrain achieved: generation {res['gen_gflops']:.1f} GFLOP/s = {100 * res['gen_frac']:.1f}% "
                      f"of GEMM ({res['gen_tokens']:.0f} completion tok/step), logprob passes "
                      f"{res['logprob_flops'] / 1e9:.1f} GFLOP (none needed), training {res['train_gflops']:.1f} "
                      f"GFLOP/s = {100 * res['train_frac']:.1f}% of GEMM (FLOPs: posttrain's compute ledger)", flush=True)
                print(f"  roofline: posttrain's step at 100% of the GEMM rate would take {res['floor_s']:.3f} s, so "
                      f"no implementation doing this work can be more than {res['max_speedup']:.2f}x TRL here",
                      flush=True)
            tasks = [t for t, _ in zip(task_stream(make_env("arithmetic", {"digits": 3}), 0), range(a.decode_batch))]
            tps = {b: decode_tokens_per_s(resolve_model_path(name, seed=0), tasks, b, a.max_new_tokens, a.bf16)
                   for b in (1, a.decode_batch)}
            decode[name] = {"n_params": n_params, "tokens_per_s": tps}
            for b, v in tps.items():
                frac = 2 * n_params * v / 1e9 / ceiling
                print(f"  decode {name} batch {b}: {v:.0f} tok/s = {2 * n_params * v / 1e9:.1f} GFLOP/s = "
                      f"{100 * frac:.2f}% of GEMM; {b / v * 1e3:.2f} ms per decode step", flush=True)

    end = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    print(f"GEMM 2048^3 again at the end: fp32 {end['fp32']:.0f} GFLOP/s, bf16 {end['bf16']:.0f} GFLOP/s "
          f"(the % of GEMM figures above use the start value)", flush=True)
    print(f"\nFinal (median s/step over {a.steps} measured steps per framework, {a.rounds} alternating rounds, "
          f"{a.prompts} prompts x {a.group} samples x {a.max_new_tokens} max new tokens, "
          f"{'bf16 autocast' if a.bf16 else 'fp32'}, {a.threads} threads, load avg at start "
          f"{info['load'][0]:.2f}, now {os.getloadavg()[0]:.2f}):")
    print("| model | lengths | posttrain s/step | TRL s/step | speed-up | gen % of GEMM | train % of GEMM "
          "| floor s/step (100% GEMM) | largest reachable speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['mode']} | {r['pt_time/step_s']:.3f} | {r['trl_step_s']:.3f} | "
              f"{r['trl_step_s'] / r['pt_time/step_s']:.2f}x | {100 * r['gen_frac']:.1f}% | "
              f"{100 * r['train_frac']:.1f}% | {r['floor_s']:.3f} | {r['max_speedup']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "gemm_gflops": gemm, "gemm_gflops_end": end, "args": vars(a),
                                            "results": results, "decode": decode}, indent=1, default=str))


if __name__ == "__main__":
    main()
