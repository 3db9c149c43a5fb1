"""Held-out evaluation: greedy exact-match plus n samples per problem for pass@k, mean@n and maj@n with
bootstrap confidence intervals. Uses the environment's own `score`, the same function RL rewards come from."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.prompts import render_prompt
from posttrain.envs.multiturn import is_multi_turn
from posttrain.envs.scoring import info_means, score_many
from posttrain.records import SamplingParams
from posttrain.rollout.episodes import episode_summary, run_episodes
from posttrain.science.passk import majority_correct, summarize_eval

EVAL_SEED = 0  # the held-out problem set is the same for every run seed, so runs are comparable
DRAW_PATIENCE = 2000  # draws in a row without a new problem after which the split counts as exhausted


def distinct_tasks(stream: Iterable[Any], n: int, patience: int = DRAW_PATIENCE) -> list[Any]:
    """Up to `n` problems of `stream` that differ in content (question and answer): a generated split may hold
    fewer distinct problems than asked (1-digit arithmetic has 12), and a repeat would count one problem twice.
    Stops at `n`, at the end of a finite stream, or after `patience` draws in a row that bring nothing new."""
    seen: set[tuple[str, str]] = set()
    out: list[Any] = []
    since_new = 0
    for task in stream:
        if len(out) >= n or since_new >= patience:
            break
        key = (repr(task.question), repr(task.answer))
        if key in seen:
            since_new += 1
            continue
        seen.add(key)
        out.append(task)
        since_new = 0
    return out


def shortfall_warning(env_name: str, split: str, requested: int, found: int) -> str | None:
    """The line a run log or console shows when the split holds fewer distinct problems than asked, else None."""
    if found >= requested:
        return None
    return (f"warning: eval on {env_name}/{split} asked for {requested} problems but only {found} distinct exist; "
            f"evaluating those {found}")
GENERATE_CHUNK = 512  # sequences per engine call: bounds KV-cache memory


def generate_chunked(engine, prompts: Sequence[list[int]], params: SamplingParams, progress=None, done: int = 0):
    """`progress(completions done so far)`, if given, after every chunk (the eval command's progress bar)."""
    out = []
    for i in range(0, len(prompts), GENERATE_CHUNK):
        chunk_params = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
        out.extend(engine.generate(prompts[i: i + GENERATE_CHUNK], chunk_params))
        if progress is not None:
            progress(done + len(out))
    return out


def evaluate(engine, tokenizer, env, *, problems: int, samples: int, ks: Sequence[int], temperature: float,
             top_p: float, max_new_tokens: int, seed: int, chat_template: bool = True,
             max_len: int | None = None, greedy_only: bool = False, split: str = "eval",
             score=None, progress=None) -> dict[str, Any]:
    """`score(tasks, texts) -> list[Score]` defaults to the isolated scoring pool with default limits."""
    score = score or (lambda tasks, texts: score_many(env, tasks, texts))
    tasks = distinct_tasks(env.tasks(split, EVAL_SEED), problems)
    prompts = [render_prompt(tokenizer, env.prompt(t), chat_template=chat_template, max_len=max_len) for t in tasks]

    def sample(rows: list, row_prompts: list, params: SamplingParams, done: int = 0) -> tuple[list, list]:
        if is_multi_turn(env):  # whole episodes; the environment's verdict is the score
            return run_episodes(engine, env, tokenizer, rows, row_prompts, params, chat_template=chat_template,
                                max_episode_tokens=max_len, step_timeout_s=getattr(score, "timeout_s", 10.0))
        completions = generate_chunked(engine, row_prompts, params, progress, done=done)
        return completions, score(rows, [c.text for c in completions])

    _, greedy_scores = sample(tasks, prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    result: dict[str, Any] = {
        "env": env.name, "split": split, "problems": len(tasks), "problems_requested": problems,
        "answer_format": getattr(env, "answer_format", None),  # how answers were read (envs/base.py)
        "greedy_acc": sum(s.correct for s in greedy_scores) / max(1, len(tasks)),
    }
    if warning := shortfall_warning(env.name, split, problems, len(tasks)):
        result["warnings"] = [warning]
    if greedy_only:
        return result
    sampled, scores = sample([t for t in tasks for _ in range(samples)], [p for p in prompts for _ in range(samples)],
                             SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                            seed=seed), done=len(prompts))
    texts = [c.text for c in sampled]
    rows = []
    errors = sum(1 for s in [*greedy_scores, *scores] if "error" in s.info)
    for i, task in enumerate(tasks):
        block = slice(i * samples, (i + 1) * samples)
        correct = [s.correct for s in scores[block]]
        rows.append({"id": task.id, "difficulty": task.difficulty, "n": samples, "c": int(sum(correct)),
                     "greedy_correct": greedy_scores[i].correct,
                     "majority_correct": majority_correct([t.strip() for t in texts[block]], correct),
                     "example": texts[block][0][:200],
                     # what RL maximises: the verdict's 0/1 for a plain verifier (then equal to mean@n), a number of
                     # its own for a shaped or custom reward (a length penalty, a reward halved per retry)
                     "reward_mean": sum(float(s.reward) for s in scores[block]) / samples})
    result.update(summarize_eval(rows, ks, seed=seed))
    if any("source" in t.meta for t in tasks):  # a mixture ([[env.sources]]): accuracy of each source's problems
        result["by_source"] = by_source(tasks, rows)
    if means := info_means(scores, getattr(env, "info_metrics", ())):  # a reward's declared diagnostics
        result["info"] = means
    if summary := episode_summary(sampled, scores):  # multi-turn: turns, tool calls, ... of the sampled episodes
        result["episode"] = summary
    result.update({"samples": samples, "ks": list(ks), "temperature": temperature, "top_p": top_p,
                   "max_new_tokens": max_new_tokens, "score_errors": errors, "per_problem": rows})
    return result


@dataclass(frozen=True)
class Evaluator:
    """A run's held-out evaluation protocol ([eval]) bound to its engine, environment and scorer."""

    engine: Any
    tokenizer: Any
    env: Any
    score: Any  # (tasks, texts) -> scores, e.g. envs.scoring.Scorer
    problems: int
    samples: int
    ks: Sequence[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    chat_template: bool = True
    max_len: int | None = None
    suites: Sequence[tuple[str, Any, int]] = ()  # ([[eval.suites]]) (label, environment, problems)

    def __call__(self, *, greedy_only: bool = False) -> dict[str, Any]:
        result = self.run(self.env, self.problems, self.score, greedy_only)
        if self.suites:
            rebind = getattr(self.score, "with_env", None)  # a Scorer keeps its limits for the suite's verifier
            result["suites"] = {label: self.run(env, problems, rebind(env) if rebind else None, greedy_only)
                                for label, env, problems in self.suites}
        return result

    def run(self, env: Any, problems: int, score: Any, greedy_only: bool) -> dict[str, Any]:
        return evaluate(self.engine, self.tokenizer, env, problems=problems, samples=self.samples,
                        ks=self.ks, temperature=self.temperature, top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens, seed=self.seed, chat_template=self.chat_template,
                        max_len=self.max_len, greedy_only=greedy_only, score=score)


def by_source(tasks: Sequence[Any], rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per source of a mixture: its problems, greedy accuracy and mean@n (the share of correct samples)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in zip(tasks, rows, strict=True):
        acc = out.setdefault(str(task.meta.get("source", "")), {"problems": 0, "greedy_acc": 0.0, "mean@n": 0.0})
        acc["problems"] += 1
        acc["greedy_acc"] += row["greedy_correct"]
        acc["mean@n"] += row["c"] / row["n"]
    for acc in out.values():
        acc["greedy_acc"] /= acc["problems"]
        acc["mean@n"] /= acc["problems"]
    return out


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The flat `eval/...` metrics logged to metrics.jsonl."""
    out = {"eval/greedy_acc": result["greedy_acc"]}
    for key, value in result.items():
        if isinstance(value, dict) and "mean" in value:
            out[f"eval/{key}"] = value["mean"]
    for label, suite in result.get("suites", {}).items():
        out.update({f"eval/{label}/{k[5:]}": v for k, v in headline_metrics(suite).items()})
    out.update({f"eval/episode/{k}": v for k, v in result.get("episode", {}).items()})
    out.update({f"eval/info/{k}": v for k, v in result.get("info", {}).items()})
    for source, acc in result.get("by_source", {}).items():
        out.update({f"eval/by_source/{source}/{k}": v for k, v in acc.items()})
    return out


def write_eval(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
