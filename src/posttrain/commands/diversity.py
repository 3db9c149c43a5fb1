"""`posttrain data diversity FILE` and `posttrain data select FILE`: the commands over data/diversity.py."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from posttrain.commands.args import parse_env_args
from posttrain.data.diversity import (
    GradientFeatures,
    distinct_n,
    nearest_centre,
    ngram_vendi,
    select_diverse,
    shortfall,
    vendi_score,
)
from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.data.sft import read_pairs
from posttrain.data.tables import read_rows
from posttrain.envs import make_env
from posttrain.envs.base import extract_answer
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer, resolve_model_path
from posttrain.outputs import atomic_file, check_output
from posttrain.records import Task

FILTERS = ("majority", "verifier", "none")


def prompt_text(prompt: str | list) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def check_at_least_one(**flags: int | None) -> None:
    """Each given count (--layers, --dim, -n, --clusters; None: not given) is at least 1."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise UserError(f"{'-n' if name == 'n' else '--' + name} {value}: must be at least 1")


class Proxy:
    """The proxy model, loaded once: sketched gradient features of (where, prompt, completion) rows."""

    def __init__(self, model: str, *, layers: int, dim: int, seed: int, chat_template: bool,
                 console: Console | None) -> None:
        check_at_least_one(layers=layers, dim=dim)
        path = resolve_model_path(model, seed, key="--model")
        self.model, self.chat_template, self.console = load_model(path), chat_template, console
        available = getattr(self.model.config, "num_hidden_layers", None)
        if available is not None and layers > available:
            raise UserError(f"--layers {layers}: the proxy model {model} has {available} decoder layers")
        self.tokenizer = load_tokenizer(path, require_chat_template=chat_template)
        self.features = GradientFeatures(self.model, layers=layers, dim=dim, seed=seed)

    def __call__(self, pairs: list[tuple[str, Any, str]]) -> Any:
        max_len = getattr(self.model.config, "max_position_embeddings", None)
        examples = []
        for where, prompt, completion in pairs:
            ids = render_prompt(self.tokenizer, prompt, chat_template=self.chat_template)
            target = completion_ids(self.tokenizer, completion, chat_template=self.chat_template)
            if max_len is not None and len(ids) + len(target) > max_len:
                raise UserError(f"{where}: prompt + completion are {len(ids) + len(target)} tokens, more than the "
                                f"proxy model's context of {max_len}")
            examples.append((ids, target))
        with Progress(TextColumn("gradients"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=self.console, disable=self.console is None, transient=True) as bar:
            task = bar.add_task("", total=len(examples))
            return self.features(examples, progress=lambda done: bar.update(task, completed=done))


def features_of(pairs: list[tuple[str, Any, str]], *, model: str, layers: int, dim: int, seed: int,
                chat_template: bool, console: Console | None) -> Any:
    """The sketched gradient feature of every (where, prompt, completion) row under the proxy model."""
    return Proxy(model, layers=layers, dim=dim, seed=seed, chat_template=chat_template, console=console)(pairs)


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
            # a structured answer (the code environment's test cases, as --generate writes them) stays as it is
            answer = row["answer"] if isinstance(row["answer"], list | dict) else str(row["answer"])
            try:
                keep.append(env.score(Task(str(i), question, answer, ""), row["completion"]).correct)
            except Exception as e:  # noqa: BLE001 - any verifier's failure on this row's answer is the row's fault
                raise UserError(f"row {i + 1}: the verifier of --env cannot score it against its answer "
                                f"{str(row['answer'])[:80]!r} ({type(e).__name__}: {e})") from None
        return keep
    answers = [extract_answer(r["completion"]) for r in rows]
    by_prompt: dict[str, Counter] = {}
    for row, answer in zip(rows, answers, strict=True):
        by_prompt.setdefault(json.dumps(row["prompt"]), Counter())[answer] += 1
    return [by_prompt[json.dumps(r["prompt"])].most_common(1)[0][0] == a for r, a in zip(rows, answers, strict=True)]


def over_generate(proxy: Proxy, environment: Any, feats: Any, rows: list[dict[str, Any]], *, n: int, budget: int,
                  clusters: int | None, seed: int) -> tuple[Any, list[dict[str, Any]]]:
    """Draw up to `budget` new tasks from the environment's training split (their gold solutions as completions)
    and keep those whose features fall in a cluster short of n / k members, until none is short. -> the added
    features and rows."""
    import torch

    centres, need = shortfall(feats, n, clusters=clusters, seed=seed)
    known = {json.dumps(r["prompt"]) for r in rows}
    added_feats, added_rows, drawn = [], [], 0
    stream = iter(environment.tasks("train", seed + 1))
    while need and drawn < budget:
        batch = []
        for task in stream:
            prompt = environment.prompt(task)
            prompt = prompt[-1]["content"] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            if json.dumps(prompt) not in known:
                known.add(json.dumps(prompt))
                batch.append({"prompt": prompt, "completion": task.solution, "answer": task.answer,
                              "generated": True})
            if len(batch) == min(64, budget - drawn):
                break
        if not batch:
            break
        drawn += len(batch)
        f = proxy([(f"generated row {drawn}", r["prompt"], r["completion"]) for r in batch])
        for row, feat, cluster in zip(batch, f, nearest_centre(f, centres).tolist(), strict=True):
            if need.get(cluster, 0) > 0:
                need[cluster] -= 1
                need = {c: k for c, k in need.items() if k > 0}
                added_feats.append(feat)
                added_rows.append(row)
    return (torch.stack(added_feats) if added_feats else feats[:0]), added_rows


def select(path: Path, out: Path, *, n: int, how: str, env: str | None, env_args: list[str], model: str,
           layers: int, dim: int, seed: int, chat_template: bool, clusters: int | None, generate: int = 0,
           console: Console | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the n-row subset of `path` that passes the filter and covers its gradient clusters evenly; with
    `generate` > 0, first fill the under-represented clusters with up to that many new tasks from --env.
    `out` may not be `path` (refused even with overwrite) nor an existing file unless `overwrite`."""
    if how not in FILTERS:
        raise UserError(f"--filter must be one of {', '.join(FILTERS)}, got {how!r}")
    check_at_least_one(n=n, clusters=clusters, layers=layers, dim=dim)
    if generate < 0:
        raise UserError(f"--generate {generate}: must be at least 0")
    check_output(out, inputs=[path], overwrite=overwrite)
    if generate and not env:
        raise UserError("--generate needs --env (the environment that makes the new tasks)")
    pairs = read_pairs(path, None, section="data")
    rows = [row for _, _, row in read_rows(path, None, what="data")]
    environment = make_env(env, parse_env_args(env_args)) if env else None
    keep = quality_filter(rows, how, environment)
    kept = [i for i, k in enumerate(keep) if k]
    if not kept:
        raise UserError(f"no row of {path} passes --filter {how}")
    proxy = Proxy(model, layers=layers, dim=dim, seed=seed, chat_template=chat_template, console=console)
    feats = proxy([pairs[i] for i in kept])
    rows = [rows[i] for i in kept]
    before = vendi_score(feats)
    if generate:
        import torch

        new_feats, new_rows = over_generate(proxy, environment, feats, rows, n=n, budget=generate,
                                            clusters=clusters, seed=seed)
        feats, rows = torch.cat([feats, new_feats]), rows + new_rows
    picked = select_diverse(feats, n, seed=seed)
    baseline = sorted(random.Random(seed).sample(range(len(kept)), min(n, len(kept))))  # of the file's rows
    with atomic_file(out) as f:
        for i in picked:
            f.write(json.dumps(rows[i], default=str) + "\n")
    return {"file": str(path), "out": str(out), "rows": len(pairs), "passed_filter": len(kept), "filter": how,
            "generated": len(rows) - len(kept), "selected": len(picked),
            "selected_generated": sum(1 for i in picked if i >= len(kept)),
            "g_vendi_selected": vendi_score(feats[picked]), "g_vendi_random_subset": vendi_score(feats[baseline]),
            "g_vendi_all_passing": before}
