"""`posttrain eval TARGET`: evaluate a run, a checkpoint or any local HF model on an environment's held-out split.

    posttrain eval runs/quickstart                        # the run's final model, with the run's own protocol
    posttrain eval runs/quickstart --n 64 --k 1,8,64      # ... with more samples per problem
    posttrain eval runs/quickstart/checkpoints/step_900   # a checkpoint of the run, same protocol
    posttrain eval /ckpts/Qwen2.5-0.5B --env arithmetic --env-arg digits=3

Inside a run, every setting not given on the command line comes from the run's recipe (environment and its
arguments, eval problems / samples / ks / temperature / top_p / max_new_tokens, chat template, bf16, seed), so the
numbers are comparable with the run's own evaluations. The result goes to RUN/eval/adhoc/ (a new file each time,
never over the run's own evaluations, which the report reads as the run's models), or beside a checkpoint that is
not in a run. An explicit `--out` that exists is refused unless `--overwrite`, as is one inside the model's
directory; a temperature must be finite and >= 0 (nothing is recorded otherwise).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from posttrain import rundir
from posttrain.commands.args import parse_env_args
from posttrain.data.prompts import stop_token_ids
from posttrain.envs import make_env
from posttrain.envs.base import SPLITS
from posttrain.envs.scoring import Scorer
from posttrain.errors import UserError
from posttrain.evals.evaluate import evaluate
from posttrain.models import (
    PRESETS,
    SOURCES,
    attention_for,
    load_model,
    load_tokenizer,
    model_note,
    resolve_bf16,
    resolve_device,
    resolve_model_path,
)
from posttrain.outputs import check_output, write_atomic
from posttrain.rollout.local import LocalEngine

DEFAULTS = {"problems": 200, "samples": 16, "ks": [1, 8], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32,
            "chat_template": True, "bf16": False}


def check_temperature(value: float, flag: str = "--temperature") -> None:
    """A sampling temperature is a finite number >= 0 (0: greedy); nan or -1 would be recorded as the protocol."""
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} {value}: must be a finite number >= 0 (0 samples greedily)")


def resolve_target(target: str) -> tuple[str, Path | None, dict[str, Any]]:
    """-> (model path, preset or model source name, the run directory it belongs to or None, that run's config or
    {})."""
    if target in PRESETS or target in SOURCES:
        return target, None, {}
    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"{target}: no such directory, and not a preset ({', '.join(PRESETS)}) or a model source "
                        f"({', '.join(SOURCES)})")
    if rundir.is_run_dir(path):  # a run directory: its final model
        final = path / "final"
        if not (final / "config.json").is_file():
            ckpts = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
            hint = f"; evaluate a checkpoint instead, e.g. {ckpts[-1]}" if ckpts else ""
            raise UserError(f"{path} is a run directory whose run has not finished (no final/ model){hint}")
        return str(final), path, rundir.read_saved(path)["config"]
    for parent in path.resolve().parents:  # a checkpoint or final/ inside a run
        if rundir.is_run_dir(parent):
            return str(path), parent, rundir.read_saved(parent)["config"]
    return str(path), None, {}


def protocol(config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """What was given on the command line, else the run's recipe, else the defaults."""
    from_run = {**{k: v for k, v in config.get("eval", {}).items() if k in DEFAULTS},
                **({"chat_template": config["model"]["chat_template"], "bf16": config["model"]["bf16"]}
                   if "model" in config else {})}
    chosen = {**DEFAULTS, **from_run, **{k: v for k, v in given.items() if v is not None}}
    chosen["env"] = given.get("env") or config.get("env", {}).get("name")
    chosen["env_args"] = {**(config.get("env", {}).get("args", {}) if not given.get("env") else {}),
                          **given.get("env_args", {})}
    chosen["seed"] = given["seed"] if given.get("seed") is not None else config.get("seed", 0)
    return chosen


def run_eval(target: str, *, env: str | None, env_args: list[str], split: str, problems: int | None,
             n: int | None, ks: list[int] | None, temperature: float | None, top_p: float | None,
             max_new_tokens: int | None, seed: int | None, bf16: bool | None, out: Path | None,
             chat_template: bool | None, console: Console, overwrite: bool = False) -> dict[str, Any]:
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    model_path, run_dir, config = resolve_target(target)
    p = protocol(config, {"env": env, "env_args": parse_env_args(env_args), "problems": problems, "samples": n,
                          "ks": ks, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                          "seed": seed, "bf16": bf16, "chat_template": chat_template})
    if p["env"] is None:
        raise UserError(f"{target} is not inside a run directory, so give the environment: --env NAME "
                        "(`posttrain envs` lists them)")
    for key, flag in (("problems", "--problems"), ("samples", "--n"), ("max_new_tokens", "--max-new-tokens")):
        if p[key] < 1:
            raise UserError(f"{flag} {p[key]}: must be at least 1")
    bad = [k for k in p["ks"] if k < 1 or k > p["samples"]]
    if bad:
        raise UserError(f"--k {bad}: every k must be between 1 and --n {p['samples']}")
    check_temperature(p["temperature"])
    if not (0 < p["top_p"] <= 1):  # also false for nan
        raise UserError(f"--top-p {p['top_p']}: must be in (0, 1]")
    if out is not None:
        check_output(out, inputs=[Path(model_path)] if Path(model_path).exists() else [], overwrite=overwrite)
    path = resolve_model_path(model_path, p["seed"])
    device = resolve_device("auto")
    model = load_model(path, attention=attention_for(device)).to(device)
    tokenizer = load_tokenizer(path, require_chat_template=p["chat_template"])
    environment = make_env(p["env"], p["env_args"])
    torch.manual_seed(p["seed"])
    engine = LocalEngine(model, tokenizer, bf16=resolve_bf16(p["bf16"], device),
                         stop_ids=stop_token_ids(tokenizer, model.generation_config, chat_template=p["chat_template"]))
    total = p["problems"] * (p["samples"] + 1)
    source = f"the protocol of {run_dir}" if run_dir else "the defaults"
    console.print(f"evaluating {path} on {p['env']}/{split}: {p['problems']} problems x {p['samples']} samples "
                  f"(unset options from {source})", markup=False, highlight=False)
    if (note := model_note(path)) is not None:  # weights converted from a quantized GGUF (models/gguf.py)
        console.print(f"note: {note}", markup=False, highlight=False)
    with _progress(console, total) as advance:
        result = evaluate(engine, tokenizer, environment, problems=p["problems"], samples=p["samples"], ks=p["ks"],
                          temperature=p["temperature"], top_p=p["top_p"], max_new_tokens=p["max_new_tokens"],
                          seed=p["seed"], chat_template=p["chat_template"],
                          max_len=getattr(model.config, "max_position_embeddings", None), split=split,
                          score=Scorer(environment, max_error_frac=None), progress=advance)
    result.update({"checkpoint": str(path), "tag": f"{p['env']} (posttrain eval)", "adhoc": True,
                   "protocol": {k: v for k, v in p.items()}, "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    target_file = out or default_output(run_dir, Path(path), p["env"], split, p["samples"])
    write_atomic(target_file, json.dumps(result, indent=1))
    for warning in result.get("warnings", []):  # fewer distinct problems than asked (evals/evaluate.py)
        console.print(warning, markup=False, highlight=False)
    console.print(eval_table(result))
    console.print(f"written: {target_file}", markup=False, highlight=False)
    return result


class _progress:
    """Completions generated so far, with an ETA: a bar on a terminal, a line every 30 s in a log."""

    def __init__(self, console: Console, total: int):
        self.console, self.total = console, total
        self.bar = None

    def __enter__(self):
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("eval", total=self.total)
        self.start = self.last = time.time()
        return self.advance

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            return
        now = time.time()
        if now - self.last >= 30 or done >= self.total:
            rate = done / max(now - self.start, 1e-9)
            self.console.print(f"eval {done}/{self.total} completions, eta {(self.total - done) / rate:.0f} s",
                               markup=False, highlight=False)
            self.last = now

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def default_output(run_dir: Path | None, model: Path, env: str, split: str, n: int) -> Path:
    """RUN/eval/adhoc/<env>-<model>-<split>-n<N>.json inside a run, else beside the model; never an existing file."""
    stem = f"{env}-{model.name}-{split}-n{n}".replace("/", "_").replace(":", "_")
    base = run_dir / "eval" / "adhoc" if run_dir else model.parent
    if not run_dir:
        stem = f"eval-{stem}"
    path, k = base / f"{stem}.json", 2
    while path.exists():
        path, k = base / f"{stem}-{k}.json", k + 1
    return path


def eval_table(result: dict[str, Any]) -> Table:
    asked = result.get("problems_requested", result["problems"])
    shown = f"{result['problems']} problems" + (f" (all distinct ones; {asked} asked)" if asked > result["problems"]
                                                 else "")
    table = Table(title=escape(f"{result['env']} / {result.get('split', 'eval')}: {shown}, "
                               f"n = {result.get('samples', 1)}"))
    for col in ("metric", "mean", "95% CI"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    table.add_row("greedy accuracy", f"{result['greedy_acc']:.3f}", "")
    for key, value in result.items():
        if isinstance(value, dict) and "mean" in value and key != "mean@n":
            table.add_row(key, f"{value['mean']:.3f}", f"[{value['ci_low']:.3f}, {value['ci_high']:.3f}]")
    by_diff = result.get("by_difficulty") or {}
    if len(by_diff) > 1:
        for level, values in sorted(by_diff.items()):
            table.add_row(f"difficulty {level} pass@1", f"{values.get('pass@1', float('nan')):.3f}",
                          f"({values.get('count', '?')} problems)")
    return table
