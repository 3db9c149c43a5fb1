"""`posttrain data diversity FILE` and `posttrain data select FILE`: the commands over data/diversity.py."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from posttrain.data.diversity import GradientFeatures, distinct_n, ngram_vendi, select_diverse, vendi_score
from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.data.sft import read_pairs
from posttrain.data.tables import read_rows
from posttrain.envs import make_env
from posttrain.envs.base import extract_answer
from posttrain.errors import UserError
from posttrain.evals.eval_cmd import parse_env_args
from posttrain.models import load_model, load_tokenizer, resolve_model_path
from posttrain.records import Task

FILTERS = ("majority", "verifier", "none")


def prompt_text(prompt: str | list) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def features_of(pairs: list[tuple[str, Any, str]], *, model: str, layers: int, dim: int, seed: int,
                chat_template: bool, console: Console | None) -> Any:
    """The sketched gradient feature of every (where, prompt, completion) row under the proxy model."""
    path = resolve_model_path(model, seed, key="--model")
    proxy = load_model(path)
    tokenizer = load_tokenizer(path, require_chat_template=chat_template)
    max_len = getattr(proxy.config, "max_position_embeddings", None)
    examples = []
    for where, prompt, completion in pairs:
        ids = render_prompt(tokenizer, prompt, chat_template=chat_template)
        target = completion_ids(tokenizer, completion, chat_template=chat_template)
        if max_len is not None and len(ids) + len(target) > max_len:
            raise UserError(f"{where}: prompt + completion are {len(ids) + len(target)} tokens, more than the proxy "
                            f"model's context of {max_len}")
        examples.append((ids, target))
    with Progress(TextColumn("gradients"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=console is None, transient=True) as bar:
        task = bar.add_task("", total=len(examples))
        return GradientFeatures(proxy, layers=layers, dim=dim, seed=seed)(
            examples, progress=lambda done: bar.update(task, completed=done))


def diversity(path: Path, *, model: str, layers: int, dim: int, seed: int, chat_template: bool,
              columns: dict[str, str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """G-Vendi and the n-gram baselines of an SFT file."""
    pairs = read_pairs(path, columns, section="data")
    feats = features_of(pairs, model=model, layers=layers, dim=dim, seed=seed, chat_template=chat_template,
                        console=console)
    texts = [f"{prompt_text(p)}\n{c}" for _, p, c in pairs]
    return {"file": str(path), "examples": len(pairs), "g_vendi": vendi_score(feats), "model": model,
            "layers": layers, "dim": dim, "seed": seed, "ngram_vendi_2": ngram_vendi(texts, 2),
            **{f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}}


def quality_filter(rows: list[dict[str, Any]], how: str, env: Any | None) -> list[bool]:
    """Which rows pass: `verifier` (the environment scores the completion against the row's `answer`),
    `majority` (the completion's answer is the most common answer among the rows of its prompt) or `none`."""
    if how == "none":
        return [True] * len(rows)
    if how == "verifier":
        if env is None:
            raise UserError("--filter verifier needs --env (the environment whose verifier checks the rows)")
        keep = []
        for i, row in enumerate(rows):
            if "answer" not in row:
                raise UserError(f"row {i + 1}: --filter verifier needs an 'answer' column (the reference answer)")
            question = prompt_text(row["prompt"])
            keep.append(env.score(Task(str(i), question, str(row["answer"]), ""), row["completion"]).correct)
        return keep
    answers = [extract_answer(r["completion"]) for r in rows]
    by_prompt: dict[str, Counter] = {}
    for row, answer in zip(rows, answers, strict=True):
        by_prompt.setdefault(json.dumps(row["prompt"]), Counter())[answer] += 1
    return [by_prompt[json.dumps(r["prompt"])].most_common(1)[0][0] == a for r, a in zip(rows, answers, strict=True)]


def select(path: Path, out: Path, *, n: int, how: str, env: str | None, env_args: list[str], model: str,
           layers: int, dim: int, seed: int, chat_template: bool, clusters: int | None,
           console: Console | None = None) -> dict[str, Any]:
    """Write the n-row subset of `path` that passes the filter and covers its gradient clusters evenly."""
    if how not in FILTERS:
        raise UserError(f"--filter must be one of {', '.join(FILTERS)}, got {how!r}")
    pairs = read_pairs(path, None, section="data")
    rows = [row for _, _, row in read_rows(path, None, what="data")]
    keep = quality_filter(rows, how, make_env(env, parse_env_args(env_args)) if env else None)
    kept = [i for i, k in enumerate(keep) if k]
    if not kept:
        raise UserError(f"no row of {path} passes --filter {how}")
    feats = features_of([pairs[i] for i in kept], model=model, layers=layers, dim=dim, seed=seed,
                        chat_template=chat_template, console=console)
    picked = select_diverse(feats, n, clusters=clusters, seed=seed)
    baseline = sorted(random.Random(seed).sample(range(len(kept)), min(n, len(kept))))
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as f:
        for i in picked:
            f.write(json.dumps(rows[kept[i]], default=str) + "\n")
    tmp.replace(out)
    return {"file": str(path), "out": str(out), "rows": len(rows), "passed_filter": len(kept), "filter": how,
            "selected": len(picked), "g_vendi_selected": vendi_score(feats[picked]),
            "g_vendi_random_subset": vendi_score(feats[baseline]), "g_vendi_all_passing": vendi_score(feats)}
