"""Time to a target accuracy: posttrain's RL (as shipped, and with its system levers) against TRL's GRPOTrainer.

    python benchmarks/time_to_target.py --json ttt.json --plot time_to_target.png > ttt.log 2>&1  # 3 seeds
    python benchmarks/time_to_target.py --quick       # smoke: seed 0, target 0.3, 20 steps, 50 eval problems

Start: ONE shared SFT checkpoint, the quickstart's SFT stage alone (recipes/quickstart.toml without [rl], seed
--sft-seed), run once as `posttrain run WORK/sft.toml` and reused afterwards (or --sft-dir). From it, per seed,
RL until held-out pass@1 (--eval-problems problems x the quickstart's [eval] samples, temperature and
max_new_tokens) first reaches --target, evaluated at step 0 and every --eval-every steps, capped at --max-steps:
  default  `posttrain run WORK/rl.toml`: the quickstart's [rl] section as it is, from the SFT checkpoint;
  fastest  the same plus FASTEST_SET (system levers only; --fastest-set KEY=VALUE replaces the list);
  trl      TRL GRPOTrainer with the same hyperparameters (read from WORK/rl.toml), conventions of
           benchmarks/rl_step.py, evaluated by posttrain's own Evaluator on a copy of TRL's weights.
Every contender-seed is a fresh process; contenders rotate order per seed so machine drift hits all of them.
No contender writes checkpoints during training (posttrain checkpoint.every = 0, TRL save_strategy = "no").

TRL gets the [rl] values: lr, AdamW betas and weight decay, constant lr, grad clip, PPO clip (epsilon,
epsilon_high), beta 0, 32 prompts x 8 (per_device_train_batch_size 256, num_generations 8), temperature,
top_p, top_k, max_completion_length; bf16 as posttrain resolves model.bf16 = "auto" here; the attention kernel
posttrain picks (eager on CPU); gradient_checkpointing off; posttrain's prompts in posttrain's order
(task_stream, shuffle_dataset=False); reward = the environment's score. TRL's defaults where posttrain's key
has no counterpart: loss_type "dapo" (= token_mean), scale_rewards "group" with TRL's std eps (posttrain's
grpo: 1e-6), fused AdamW, and no group filter: the quickstart drops zero-variance groups (group_filter =
"zero_variance"), TRL trains them (advantage 0, but their tokens count in the dapo normaliser, so its step on
the other groups is smaller). The table gives steps to target beside seconds, so that per-step speed and
learning per step can be told apart.

The clock (training wall seconds, evaluation excluded), per contender:
  posttrain  from its metrics.jsonl: the sum of `time/elapsed_s` differences between consecutive RL rows,
             except the gaps that end in an evaluation row (a row with `eval/pass@1`). So it starts when the
             rl-step0 evaluation is logged and holds everything between step rows: sampling prompts,
             generation (or the wait for the producer thread), scoring, filtering, advantages, training, weight
             sync, metric and TensorBoard writing. Σ `time/step_s` (the same without logging): `sum_step_s`.
  trl        from a TrainerCallback: perf_counter between consecutive on_step_end calls (generation, rewards,
             loss, backward, optimizer, Trainer logging), starting after the step-0 evaluation in
             on_train_begin; an evaluation inside on_step_end is excluded.
Evaluation time (posttrain `time/eval_s`, TRL the callback's own timer) is reported separately. Time to target
is the clock at the first evaluation with pass@1 >= target (resolution: --eval-every steps); a posttrain run
then gets SIGTERM (it stops after the step in flight), TRL sets should_training_stop. The step-0 pass@1 of all
contenders of a seed should agree (same weights, problems and sampling seed); it is printed. Caveat: with
rollout.max_staleness = k > 0 posttrain's producer thread keeps generating while an evaluation runs (at most k
batches ahead, k + 1 at step 0), work that this clock does not see.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provenance import commit, cpu_model

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
CONTENDERS = ("default", "fastest", "trl")
# System levers only: what runs where and how much is logged, never what is optimised (lr, batch, group size,
# temperature, max tokens, loss, filter stay the quickstart's). Not used: model.compile (minutes of compilation
# inside the clock), vLLM/Ray (no gain on 2 CPU cores, docs/performance.md). rl.skip_zero_advantage is already on.
# max_staleness = 1 is the one lever that also changes what is learned (samples one version old): measured, it is
# where this contender's lead comes from here (fewer steps, not faster ones; docs/performance.md).
FASTEST_SET = ["rollout.max_staleness=1", "tracking.tensorboard=false", "rl.log_samples=0"]


# ---------------------------------------------------------------------------------------------------------------
# Recipes and machine


def stage_recipe(a: argparse.Namespace, work: Path, stage: str, **keys: Any) -> Path:
    """recipes/quickstart.toml reduced to one stage (a recipe may not carry a section of a stage it skips),
    with `keys` set at the top level or in a section (dict values), written as WORK/<stage>.toml."""
    from posttrain.config import read_toml, resolve_paths, to_toml, validate

    raw = resolve_paths(read_toml(QUICKSTART, missing=f"{QUICKSTART}: not found"), QUICKSTART.parent)
    for other in set(raw["recipe"]) - {stage}:
        raw.pop(other, None)
    raw.update(recipe=[stage], output_dir=str(work), threads=a.threads)
    for key, value in keys.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = work / f"{stage}.toml"
    path.write_text(to_toml(validate(raw, str(QUICKSTART))))
    return path


def machine(threads: int) -> dict[str, Any]:
    import torch

    from posttrain.models import resolve_bf16

    cpu, git = cpu_model(), commit()
    bf16 = resolve_bf16("auto", torch.device("cpu"))  # the quickstart's model.bf16 = "auto"
    return {"cpu": cpu, "threads": threads, "precision": "bf16" if bf16 else "fp32", "commit": git,
            "torch": torch.__version__, "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


# ---------------------------------------------------------------------------------------------------------------
# posttrain contenders: the real `posttrain run`, clock from metrics.jsonl


def posttrain_run(recipe: Path, name: str, overrides: list[str], log: Path, target: float) -> Path:
    """Run it in its own process; SIGTERM once an evaluation reaches the target (posttrain then stops at the end of
    the step in flight). -> the run directory."""
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--fresh"]
    cmd += [x for o in [f"name={name}", *overrides] for x in ("--set", o)]
    print("  $ posttrain " + " ".join(cmd[3:]), flush=True)
    metrics, stopped = recipe.parent / name / "metrics.jsonl", False
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(1.0)
            if not stopped and metrics.exists() and first_at(posttrain_curve(metrics)[0], target):
                proc.send_signal(signal.SIGTERM)
                stopped = True
    if proc.returncode not in (0, 143):  # 143: stopped by our SIGTERM after a checkpoint
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    return metrics.parent


def posttrain_curve(metrics: Path) -> tuple[list[dict[str, Any]], float]:
    """(points at each evaluation, total evaluation seconds) of a run's RL stage. See the module docstring."""
    # [:-1]: a line the run is still writing (no newline yet) is left for the next read
    rows = [json.loads(x) for x in metrics.read_text().split("\n")[:-1] if x.strip()]
    points, clock, step_sum, last = [], 0.0, 0.0, None
    for r in (r for r in rows if r.get("stage") == "rl"):
        if "eval/pass@1" in r:  # the gap since the last row is evaluation: not on the clock
            points.append({"step": r["step"], "clock_s": clock, "sum_step_s": step_sum, "pass@1": r["eval/pass@1"],
                           "pass@8": r.get("eval/pass@8"), "greedy_acc": r.get("eval/greedy_acc"),
                           "eval_s": r["time/eval_s"]})
        elif last is not None:
            clock += r["time/elapsed_s"] - last
            step_sum += r.get("time/step_s", 0.0)
        if "eval/pass@1" in r or last is not None:
            last = r["time/elapsed_s"]
    return points, sum(p["eval_s"] for p in points)


# ---------------------------------------------------------------------------------------------------------------
# TRL contender (runs in a child process: this script with --trl-worker SEED)


def trl_worker(a: argparse.Namespace, seed: int, work: Path) -> None:
    import itertools
    import warnings

    import torch
    import transformers
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.config import load_recipe
    from posttrain.data.prompts import context_length, stop_token_ids
    from posttrain.data.samplers import task_stream
    from posttrain.envs import make_env
    from posttrain.envs.scoring import Scorer, shutdown_pool
    from posttrain.evals.evaluate import Evaluator
    from posttrain.models import attention_for, load_model, load_tokenizer, resolve_bf16
    from posttrain.rollout.base import build_engine

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(seed)
    cfg = load_recipe(work / "rl.toml", [f"seed={seed}"])  # the very config the posttrain contenders run
    rl, ev, cpu = cfg.section("rl"), cfg.eval, torch.device("cpu")
    if (rl.schedule, rl.kl_coef, rl.policy_loss, rl.aggregation, rl.sampler) != ("constant", 0, "ppo_clip",
                                                                                 "token_mean", "uniform"):
        raise SystemExit("trl: the mapping covers constant lr, no KL, ppo_clip, token_mean, uniform prompts")
    bf16 = resolve_bf16(cfg.model.bf16, cpu)
    model = load_model(Path(cfg.model.path), attention=attention_for(cpu, cfg.model.attention))
    tok = load_tokenizer(Path(cfg.model.path))
    env = make_env(cfg.env.name, cfg.env.args)
    train_env = make_env(cfg.env.name, {**cfg.env.args, **rl.env_args})
    # posttrain's evaluation protocol (runner.py) on an engine holding its own copy of the weights
    engine = build_engine("local", model, tok, weights="copy", bf16=bf16,
                          stop_ids=stop_token_ids(tok, model.generation_config, chat_template=cfg.model.chat_template))
    evaluator = Evaluator(engine, tok, env, Scorer(env, timeout_s=cfg.env.score_timeout_s).never_stopping(),
                          problems=ev.problems, samples=ev.samples, ks=ev.ks, temperature=ev.temperature,
                          top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, seed=seed,
                          chat_template=cfg.model.chat_template, max_len=context_length(model))
    # the prompts posttrain's uniform sampler draws, in its order (shuffle_dataset=False)
    tasks = list(itertools.islice(task_stream(train_env, seed), a.max_steps * rl.prompts_per_step))
    rows = [{"prompt": train_env.prompt(t), "task_index": i} for i, t in enumerate(tasks)]

    def reward(completions, task_index, **_) -> list[float]:
        return [train_env.score(tasks[i], c[-1]["content"]).reward for c, i in zip(completions, task_index)]

    config = GRPOConfig(
        output_dir=str(work / f"trl-seed{seed}"), use_cpu=True, bf16=bf16, seed=seed, max_steps=a.max_steps,
        per_device_train_batch_size=rl.prompts_per_step * rl.group_size, gradient_accumulation_steps=1,
        num_generations=rl.group_size, max_completion_length=rl.max_new_tokens, temperature=rl.temperature,
        top_p=rl.top_p, top_k=rl.top_k, use_vllm=False, learning_rate=rl.lr, lr_scheduler_type="constant"
        if not rl.warmup_steps else "constant_with_warmup", warmup_steps=rl.warmup_steps,
        weight_decay=rl.weight_decay, adam_beta1=rl.betas[0], adam_beta2=rl.betas[1], max_grad_norm=rl.grad_clip,
        epsilon=rl.policy_loss_args["eps_low"], epsilon_high=rl.policy_loss_args["eps_high"], beta=0.0,
        gradient_checkpointing=False, shuffle_dataset=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.clock, self.last, self.points = 0.0, 0.0, []

        def evaluate(self, model: Any, step: int) -> float:
            t0 = time.perf_counter()
            engine.update_weights(model.state_dict(), step)
            r = evaluator()
            self.points.append({"step": step, "clock_s": self.clock, "pass@1": r["pass@1"]["mean"],
                                "pass@8": r.get("pass@8", {}).get("mean"), "greedy_acc": r["greedy_acc"],
                                "eval_s": time.perf_counter() - t0})
            return r["pass@1"]["mean"]

        def on_train_begin(self, args, state, control, model=None, **_) -> None:
            self.evaluate(model, 0)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **_) -> None:
            self.clock += time.perf_counter() - self.last
            step = state.global_step
            if (step % a.eval_every == 0 or step == a.max_steps) and self.evaluate(model, step) >= a.target:
                control.should_training_stop = True
            self.last = time.perf_counter()

    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutdown_pool()
    out = {"points": clock.points, "eval_s": sum(p["eval_s"] for p in clock.points)}
    (work / f"trl-seed{seed}.json").write_text(json.dumps(out, indent=1))


def trl_run(seed: int, work: Path, log: Path) -> tuple[list[dict[str, Any]], float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--trl-worker", str(seed)]
    print(f"  $ {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
    if rc:
        raise SystemExit(f"trl seed {seed} failed (exit {rc}); see {log}")
    res = json.loads((work / f"trl-seed{seed}.json").read_text())
    return res["points"], res["eval_s"]


# ---------------------------------------------------------------------------------------------------------------
# Results


def first_at(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation with pass@1 >= target (None: not reached)."""
    return next((p for p in points if p["pass@1"] >= target), None)


def table(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> list[str]:
    """The markdown table. A seed that did not reach the target counts as infinitely slow in medians; speed-up
    ranges are over the seeds where both TRL and the contender reached it."""
    inf = float("inf")

    def secs(c: str) -> list[float]:
        return [inf if (t := results[c][s]["time_to_target_s"]) is None else t for s in seeds]

    def fmt(x: float) -> str:
        return "not reached" if x == inf else f"{x:.1f}"

    trl = secs("trl") if "trl" in results else None
    head = (f"| contender | seconds to target (steps), seeds {', '.join(map(str, seeds))} | median | range | "
            "speed-up vs TRL median (range over seeds) | eval s per run (median) |")
    lines = [head, "|---|---|---|---|---|---|"]
    for c, runs in results.items():
        xs, med = secs(c), statistics.median(secs(c))
        per_seed = ", ".join(fmt(x) + (f" ({runs[s]['steps']})" if x != inf else "") for x, s in zip(xs, seeds))
        speed = "n/a"
        if trl is not None and med not in (0, inf) and statistics.median(trl) != inf:
            ratios = [t / x for t, x in zip(trl, xs) if t != inf and x not in (0, inf)]
            speed = f"{statistics.median(trl) / med:.2f}x" + (f" ({min(ratios):.2f}-{max(ratios):.2f}x)" if ratios
                                                              else "")
        evals = statistics.median(r["eval_s"] for r in runs.values())
        lines.append(f"| {c} | {per_seed} | {fmt(med)} | {fmt(min(xs))}-{fmt(max(xs))} | {speed} | {evals:.1f} |")
    return lines


def plot(results: dict[str, dict[int, dict[str, Any]]], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (c, runs) in enumerate(results.items()):
        for j, (seed, r) in enumerate(runs.items()):
            ax.plot([p["clock_s"] for p in r["points"]], [p["pass@1"] for p in r["points"]], marker="o", ms=3,
                    color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], label=f"{c} seed {seed}")
    ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target}")
    ax.set(xlabel="training wall time, evaluation excluded (s)", ylabel="held-out pass@1",
           title="time to target: 3-digit addition, from the quickstart's SFT checkpoint")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def shared_sft(a: argparse.Namespace, work: Path) -> Path:
    """The SFT checkpoint every contender starts from; a finished SFT run is found and reused (posttrain only
    prints its summary)."""
    if a.sft_dir:
        return Path(a.sft_dir).resolve()
    name = f"sft-seed{a.sft_seed}"
    recipe = stage_recipe(a, work, "sft", name=name, seed=a.sft_seed)
    print(f"SFT checkpoint: $ posttrain run {recipe}", flush=True)
    with (work / f"{name}.log").open("a") as log:
        rc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
    if rc:
        raise SystemExit(f"the SFT stage failed (exit {rc}); see {log.name}")
    return work / name / "final"


def run_contender(a: argparse.Namespace, c: str, seed: int, work: Path, fastest: list[str]) -> dict[str, Any]:
    name, t0 = f"{c}-seed{seed}", time.time()
    if c == "trl":
        points, eval_s = trl_run(seed, work, work / f"{name}.log")
    else:
        sets = [f"seed={seed}", *(fastest if c == "fastest" else [])]
        run_dir = posttrain_run(work / "rl.toml", name, sets, work / f"{name}.log", a.target)
        points, eval_s = posttrain_curve(run_dir / "metrics.jsonl")
    hit = first_at(points, a.target)
    when = "not reached" if hit is None else f"reached at step {hit['step']}, {hit['clock_s']:.1f} s"
    print(f"{name}: pass@1 {points[0]['pass@1']:.3f} at step 0 -> {points[-1]['pass@1']:.3f} at step "
          f"{points[-1]['step']}; target {when}; evaluation {eval_s:.1f} s; process {time.time() - t0:.0f} s",
          flush=True)
    return {"points": points, "eval_s": eval_s, "time_to_target_s": None if hit is None else hit["clock_s"],
            "steps": None if hit is None else hit["step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--target", type=float, default=0.55, help="held-out pass@1 to reach")
    p.add_argument("--eval-every", type=int, default=10, help="RL steps between evaluations")
    p.add_argument("--max-steps", type=int, default=200, help="step cap; the target not reached by then: 'not reached'")
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--fastest-set", action="append", metavar="KEY=VALUE",
                   help=f"the fastest contender's overrides, repeatable (replaces the default {FASTEST_SET})")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--sft-seed", type=int, default=0)
    p.add_argument("--sft-dir", default=None, help="an existing SFT checkpoint instead of running the SFT stage")
    p.add_argument("--work-dir", default="runs/time-to-target")
    p.add_argument("--quick", action="store_true", help="smoke test: seed 0, target 0.3, 20 steps, 50 problems")
    p.add_argument("--json", default=None, help="write every curve here")
    p.add_argument("--plot", default="time_to_target.png")
    p.add_argument("--trl-worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.seeds, a.target, a.max_steps, a.eval_problems = "0", 0.3, 20, 50
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = (ROOT / a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.trl_worker is not None:
        return trl_worker(a, a.trl_worker, work)
    seeds, contenders = [int(s) for s in a.seeds.split(",")], a.contenders.split(",")
    fastest = a.fastest_set if a.fastest_set is not None else FASTEST_SET
    info = machine(a.threads)
    print(f"{info['date']}  commit {info['commit']}  {info['cpu']}  torch {info['torch']}  threads {info['threads']}  "
          f"{info['precision']}  load avg {info['load']:.2f}", flush=True)
    sft = shared_sft(a, work)
    stage_recipe(a, work, "rl", name="rl", model={"path": str(sft)}, checkpoint={"every": 0},
                 rl={"steps": a.max_steps, "eval_every": a.eval_every},
                 eval={"problems": a.eval_problems, "at_start": False})
    print(f"from {sft}: RL recipe {work / 'rl.toml'}, target pass@1 {a.target}, eval every {a.eval_every} steps, "
          f"cap {a.max_steps} steps; fastest = {fastest}", flush=True)
    results: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in contenders}
    for i, seed in enumerate(seeds):
        for c in contenders[i % len(contenders):] + contenders[: i % len(contenders)]:  # rotated per seed
            results[c][seed] = run_contender(a, c, seed, work, fastest)
        # same checkpoint, problems and sampling seed: the step-0 evaluations should agree
        print(f"seed {seed} step-0 pass@1: " + ", ".join(f"{c} {results[c][seed]['points'][0]['pass@1']:.3f}"
                                                       for c in contenders), flush=True)
    print(f"\nTime to pass@1 >= {a.target} (commit {info['commit']}, {info['cpu']}, {info['threads']} threads, "
          f"{info['precision']}; load avg {info['load']:.2f} at start, {os.getloadavg()[0]:.2f} at end):")
    print("\n".join(table(results, seeds)))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "args": vars(a), "fastest_set": fastest,
                                            "sft_dir": str(sft), "results": results}, indent=1))
    if a.plot:
        plot(results, a.target, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
