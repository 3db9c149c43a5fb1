"""`posttrain distill-data TEACHER --out FILE`: off-policy distillation data, the teacher's own verified answers.

    posttrain distill-data runs/teacher --out data/teacher.jsonl --prompts 2000 --samples 4 --keep 1
    # then an SFT stage on it: [sft] data_path = "data/teacher.jsonl"

The teacher (a run directory's final model, a checkpoint, a local HF model or a preset) samples `samples`
completions of each of the first `prompts` tasks of the environment's train split; the verifier scores them and
up to `keep` distinct correct ones per task become rows {prompt, completion, task, reward} of a JSONL file the SFT
stage reads (sft.data_path; the prompt as the environment gives it: a string or its chat messages). A teacher inside a run uses that run's environment, its arguments and its chat-template
setting unless given here. Beside the file, FILE.meta.json records what made it, how many tasks the teacher
solved, and the generation's FLOPs: the compute an SFT-on-teacher-samples run must add to its own to be compared
with on-policy methods at equal total compute. `--keep-failed` keeps unverified answers too: a model's own sample
set, e.g. the student's, for offline distillation (the opd_offline stage).

An existing FILE (or FILE.meta.json) is refused unless `--overwrite`; the rows go to FILE.tmp, renamed into place
at the end, so a failure or a SIGTERM (exit 143) leaves no partial file (posttrain/outputs.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from posttrain.commands.args import parse_env_args
from posttrain.commands.eval import check_temperature, resolve_target
from posttrain.data.prompts import stop_token_ids
from posttrain.envs import make_env
from posttrain.envs.scoring import Scorer
from posttrain.errors import UserError
from posttrain.models import (
    attention_for,
    load_model,
    load_tokenizer,
    resolve_bf16,
    resolve_device,
    resolve_model_path,
)
from posttrain.outputs import atomic_file, check_output, write_atomic
from posttrain.records import SamplingParams
from posttrain.rollout.collect import PromptRenderer, generate_groups, generation_flops
from posttrain.rollout.local import LocalEngine
from posttrain.tracking.ledger import FlopModel

CHUNK = 32  # prompts per generation call


def distill_data(teacher: str, out: Path, *, env: str | None, env_args: list[str], prompts: int, samples: int,
                 keep: int, temperature: float, max_new_tokens: int, seed: int | None, chat_template: bool | None,
                 console: Console, keep_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    for value, flag in ((prompts, "--prompts"), (samples, "--samples"), (keep, "--keep"),
                        (max_new_tokens, "--max-new-tokens")):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if keep > samples:
        raise UserError(f"--keep {keep}: cannot keep more answers per task than --samples {samples}")
    check_temperature(temperature)
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out}: the SFT stage reads .jsonl; name the file *.jsonl")
    model_path, run_dir, config = resolve_target(teacher)
    meta_path = out.with_name(out.stem + ".meta.json")
    teacher_files = [Path(model_path)] if Path(model_path).exists() else []
    for target in (out, meta_path):
        check_output(target, inputs=teacher_files, overwrite=overwrite)
    env_name = env or config.get("env", {}).get("name")
    if env_name is None:
        raise UserError(f"{teacher} is not inside a run directory, so give the environment: --env NAME")
    args = {**(config.get("env", {}).get("args", {}) if not env else {}), **parse_env_args(env_args)}
    seed = seed if seed is not None else config.get("seed", 0)
    template = chat_template if chat_template is not None else config.get("model", {}).get("chat_template", True)

    path = resolve_model_path(model_path, seed)
    device = resolve_device("auto")
    model = load_model(path, attention=attention_for(device)).to(device)
    tokenizer = load_tokenizer(path, require_chat_template=template)
    environment = make_env(env_name, args)
    engine = LocalEngine(model, tokenizer, bf16=resolve_bf16(config.get("model", {}).get("bf16", False), device),
                         stop_ids=stop_token_ids(tokenizer, model.generation_config, chat_template=template))
    scorer = Scorer(environment, max_error_frac=None)  # a failed verifier call is one unkept answer
    render = PromptRenderer(environment, tokenizer, template, None)
    flop_model = FlopModel.from_model(model)
    tasks_iter = environment.tasks("train", seed)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)

    t0, flops, done, solved, rows = time.time(), 0.0, 0, 0, 0
    columns = [TextColumn("[bold]distill-data"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[s]}"),
               TimeRemainingColumn()]
    with atomic_file(out) as f, Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        progress = bar.add_task("", total=prompts, s="")
        for chunk_index in range((prompts + CHUNK - 1) // CHUNK):
            tasks = [t for _, t in zip(range(min(CHUNK, prompts - done)), tasks_iter, strict=False)]
            if not tasks:
                break
            batch = generate_groups(engine, scorer, render, tasks,
                                    replace(params, seed=seed * 1_000_003 + chunk_index), samples)
            flops += generation_flops(flop_model, batch)
            for g, task in enumerate(tasks):
                kept: list[str] = []
                for i in (batch.group_ids == g).nonzero().squeeze(-1).tolist():
                    text = batch.completions[i].text
                    if (keep_failed or batch.scores[i].correct) and text not in kept and len(kept) < keep:
                        kept.append(text)
                        f.write(json.dumps({"prompt": environment.prompt(task), "completion": text, "task": task.id,
                                            "reward": batch.scores[i].reward}) + "\n")
                        rows += 1
                solved += any(batch.scores[i].correct for i in (batch.group_ids == g).nonzero().squeeze(-1).tolist())
            done += len(tasks)
            bar.update(progress, completed=done, s=f"{rows} rows, {solved}/{done} tasks solved")
        if rows == 0:  # inside the block: nothing replaces `out`
            raise UserError(f"the model solved none of the {done} tasks ({samples} samples each): no data "
                            "written; is it trained on this environment?")
    meta = {"teacher": str(path), "run_dir": str(run_dir) if run_dir else None, "env": env_name, "env_args": args,
            "split": "train", "prompts": done, "samples": samples, "keep": keep, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "keep_failed": keep_failed, "seed": seed, "chat_template": template, "rows": rows,
            "tasks_solved": solved, "solve_rate": solved / done, "compute/generate_flops": flops,
            "elapsed_s": round(time.time() - t0, 1)}
    write_atomic(meta_path, json.dumps(meta, indent=1))
    console.print(f"wrote {rows} rows to {out} (the model solved {solved} of {done} tasks; "
                  f"{flops:.3g} generation FLOPs, in {out.stem}.meta.json)", markup=False, highlight=False)
    return meta
