"""Fake run directories shaped like the ones `posttrain run` writes (runner.py, context.py, sft.py, rl.py):
a base eval row at step 0, SFT rows with a periodic greedy eval, an eval row closing each stage at the stage's
last step, RL rows (one with every group filtered, so only rollout keys), a reference-reset row, and eval files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SFT_STEPS, RL_STEPS, RL_EVAL_EVERY = 30, 60, 30
N_SAMPLES, N_PROBLEMS = 16, 60


def _eval_file(tag: str, step: int, stage: str, solve_p: np.ndarray, rng: np.random.Generator) -> dict:
    """An eval/<tag>.json with per-problem counts drawn from per-problem solve probabilities."""
    from posttrain.science.passk import summarize_eval

    rows = []
    for i, p in enumerate(solve_p):
        c = int(rng.binomial(N_SAMPLES, p))
        rows.append({"id": f"p{i}", "difficulty": 1 + i % 3, "n": N_SAMPLES, "c": c,
                     "greedy_correct": bool(p > 0.5), "majority_correct": bool(2 * c > N_SAMPLES),
                     "example": "12 + 7 = 19"})
    out = {"env": "arithmetic", "problems": len(rows), "greedy_acc": float(np.mean(solve_p > 0.5))}
    out.update(summarize_eval(rows, [1, 8], n_boot=200))
    out.update({"samples": N_SAMPLES, "ks": [1, 8], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32,
                "per_problem": rows, "tag": tag, "step": step, "stage": stage})
    return out


def _headline(result: dict) -> dict:
    out = {"eval/greedy_acc": result["greedy_acc"]}
    out.update({f"eval/{k}": v["mean"] for k, v in result.items() if isinstance(v, dict) and "mean" in v})
    return out


def write_fake_run(path: Path, *, seed: int = 0, evals: bool = True, rl_gain: float = 0.3) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    config = {"recipe": ["sft", "rl"], "name": path.name, "output_dir": "runs", "seed": seed, "threads": None,
              "model": {"path": "tiny-3m", "chat_template": True, "bf16": False},
              "env": {"name": "arithmetic", "args": {"max_digits": 2}},
              "sft": {"lr": 1e-3, "steps": SFT_STEPS, "batch_size": 64, "micro_batch_size": 64, "eval_every": 15},
              "rl": {"preset": "grpo" if seed == 0 else "dapo", "steps": RL_STEPS, "prompts_per_step": 16,
                     "group_size": 8, "advantage": "grpo", "policy_loss": "ppo_clip", "eps_low": 0.2,
                     "eps_high": 0.2 if seed == 0 else 0.28, "aggregation": "token_mean", "kl_estimator": "k3",
                     "kl_coef": 0.001, "group_filter": "none", "lr": 1e-4, "temperature": 1.0,
                     "max_new_tokens": 32, "eval_every": RL_EVAL_EVERY},
              "eval": {"problems": N_PROBLEMS, "samples": N_SAMPLES, "ks": [1, 8], "temperature": 1.0},
              "checkpoint": {"every": 0, "keep_last_n": 2}}
    meta = {"posttrain": "0.1.0", "code": "abc1234", "torch": "2.13.0", "python": "3.11", "host_cpus": 2}
    (path / "config.json").write_text(json.dumps({"config": config, "meta": meta}, indent=1))

    difficulty = 1 + np.arange(N_PROBLEMS) % 3
    base_p = np.clip(0.5 - 0.15 * difficulty + rng.normal(0, 0.1, N_PROBLEMS), 0.0, 1.0)
    rows, results, flops, elapsed = [], {}, 0.0, 0.0

    def eval_row(tag: str, step: int, stage: str, solve_p: np.ndarray) -> None:
        result = _eval_file(tag, step, stage, solve_p, rng)
        results[tag] = result
        rows.append({"step": step, "stage": stage, "time/elapsed_s": elapsed, "compute/flops": flops or None,
                     **_headline(result), "time/eval_s": 1.5})

    eval_row("base", 0, "base", base_p)
    for step in range(1, SFT_STEPS + 1):
        flops += 4e11
        elapsed += 0.8
        row = {"step": step, "stage": "sft", "time/elapsed_s": elapsed, "compute/flops": flops,
               "sft/loss": 2.5 * np.exp(-step / 8) + 0.3 + rng.normal(0, 0.02), "train/lr": 1e-3}
        if step == 15:
            row["eval/greedy_acc"] = 0.2
        rows.append(row)
    sft_p = np.clip(base_p + 0.2, 0, 1)
    eval_row("sft", SFT_STEPS, "sft", sft_p)
    for i in range(1, RL_STEPS + 1):
        step = SFT_STEPS + i
        flops += 3e12
        elapsed += 2.0
        progress = i / RL_STEPS
        reward = 0.35 + rl_gain * progress + rng.normal(0, 0.04)
        row = {"step": step, "stage": "rl", "time/elapsed_s": elapsed, "compute/flops": flops,
               "compute/rl_flops": 3e12 * i, "rollout/reward_mean": reward, "rollout/pass_rate": reward, "rollout/len_mean": 9 - 3 * progress,
               "rollout/effective_groups_frac": 0.7}
        if i != 7:  # step 7: every group filtered, so the learner did not run
            row.update({"pg/entropy": 1.2 * np.exp(-2 * progress), "pg/clip_frac": 0.01 + 0.02 * progress,
                        "kl/value": 0.002 * i, "pg/loss": rng.normal(0, 0.01)})
        rows.append(row)
        if i % RL_EVAL_EVERY == 0 and i < RL_STEPS:
            # RL sharpens: easy problems get near-certain, hard ones are abandoned
            eval_row(f"rl-step{i}", step, "rl", np.clip(sft_p + rl_gain * progress * (sft_p - 0.25) * 2, 0, 1))
        if i == 40:
            rows.append({"step": step, "stage": "rl", "time/elapsed_s": elapsed, "compute/flops": flops,
                         "ctrl/ref_reset": 1})
    eval_row("rl", SFT_STEPS + RL_STEPS, "rl", np.clip(sft_p + rl_gain * (sft_p - 0.25) * 2, 0, 1))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evals:
        (path / "eval").mkdir()
        for tag, result in results.items():
            (path / "eval" / f"{tag}.json").write_text(json.dumps(result, indent=1))
    summary = {"run_dir": str(path), "steps": SFT_STEPS + RL_STEPS, "elapsed_s": elapsed,
               "evals": {t: _headline(r) for t, r in results.items()}, "final_model": str(path / "final"),
               "finished_at": "2025-01-01 12:00:00"}
    (path / "summary.json").write_text(json.dumps(summary, indent=1))
    return path
