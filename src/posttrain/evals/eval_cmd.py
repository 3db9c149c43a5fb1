"""`posttrain eval CHECKPOINT --env NAME`: evaluate any local HF checkpoint on an environment's held-out split.

    posttrain eval runs/quickstart/final --env arithmetic --env-arg digits=3 --n 64 --k 1,8,64
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from posttrain.config import parse_override
from posttrain.envs import make_env
from posttrain.errors import UserError
from posttrain.evals.evaluate import evaluate, write_eval
from posttrain.models import attention_for, load_model, load_tokenizer, resolve_device, resolve_model_path
from posttrain.rollout.local import LocalEngine


def parse_env_args(items: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        args[".".join(key)] = value
    return args


def run_eval(checkpoint: str, *, env: str, env_args: list[str], split: str, problems: int, n: int, ks: list[int],
             temperature: float, top_p: float, max_new_tokens: int, seed: int, bf16: bool, out: Path | None,
             chat_template: bool, console: Console) -> dict[str, Any]:
    bad = [k for k in ks if k < 1 or k > n]
    if bad:
        raise UserError(f"--k {bad}: every k must be between 1 and --n {n}")
    path = resolve_model_path(checkpoint, seed)
    device = resolve_device("auto")
    model = load_model(path, attention=attention_for(device)).to(device)
    tokenizer = load_tokenizer(path, require_chat_template=chat_template)
    environment = make_env(env, parse_env_args(env_args))
    torch.manual_seed(seed)
    engine = LocalEngine(model, tokenizer, bf16=bf16)
    with console.status(f"evaluating {path} on {env}/{split}: {problems} problems x {n} samples"):
        result = evaluate(engine, tokenizer, environment, problems=problems, samples=n, ks=ks,
                          temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                          chat_template=chat_template, max_len=getattr(model.config, "max_position_embeddings",
                                                                       None), split=split)
    result.update({"checkpoint": str(path), "tag": env})
    target = out or default_output(Path(checkpoint), env)
    write_eval(target, result)
    console.print(eval_table(result))
    console.print(f"written: {target}")
    return result


def default_output(checkpoint: Path, env: str) -> Path:
    """Inside a run dir (runs/x/final or runs/x/checkpoints/step_N) write to runs/x/eval/; else beside it."""
    for parent in [checkpoint, *checkpoint.parents]:
        if (parent / "metrics.jsonl").exists():
            return parent / "eval" / f"{env}-{checkpoint.name}.json"
    return checkpoint.parent / f"eval-{env}-{checkpoint.name}.json"


def eval_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['env']} / {result.get('split', 'eval')}: {result['problems']} problems, "
                        f"n = {result.get('samples', 1)}")
    for col in ("metric", "mean", "95% CI"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    table.add_row("greedy accuracy", f"{result['greedy_acc']:.3f}", "")
    for key, value in result.items():
        if isinstance(value, dict) and "mean" in value:
            table.add_row(key, f"{value['mean']:.3f}", f"[{value['ci_low']:.3f}, {value['ci_high']:.3f}]")
    by_diff = result.get("by_difficulty") or {}
    if len(by_diff) > 1:
        for level, values in sorted(by_diff.items()):
            table.add_row(f"difficulty {level} pass@1", f"{values.get('pass@1', float('nan')):.3f}",
                          f"({values.get('count', '?')} problems)")
    return table
