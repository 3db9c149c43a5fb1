"""Several environments (or difficulty splits of one) as one: `[[env.sources]]` in a recipe.

    [[env.sources]]
    name = "arithmetic"
    args = {digits = [1, 2]}
    weight = 3
    label = "easy"
    [[env.sources]]
    name = "arithmetic"
    args = {digits = [4, 5]}
    label = "hard"

Each task comes from a source drawn by weight (a seeded draw per task, so the order repeats); a finite source
that runs out leaves the draw. A task's id is '<label>/<its own id>' and its meta carries `source` (the label),
which per-source metrics (rollout/pass_rate/<label>, eval by_source) and the `dump` sampler's arms read. Prompt,
score and `easier` are the source's own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from posttrain.envs.base import check_split
from posttrain.envs.registry import make_env
from posttrain.records import Message, Score, Task

ISOLATION_ORDER = ("inline", "thread", "process")  # a mixture scores as strictly as its strictest source


class Mixture:
    """Tasks from several environments by weight ([[env.sources]]), each scored by its own source."""

    name = "mixture"
    answer_format = "each source's own"

    def __init__(self, sources: list[dict[str, Any]]):
        """sources: [{name, args, weight, label}, ...] as validated by config.EnvSource."""
        if not sources:
            raise ValueError("a mixture needs at least one source")
        labels = [s.get("label") or s["name"] for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"[[env.sources]] labels must differ (a label defaults to the name), got {labels}")
        self.labels = labels
        self.weights = [float(s.get("weight", 1.0)) for s in sources]
        self.envs = {label: make_env(s["name"], s.get("args", {})) for label, s in zip(labels, sources, strict=True)}
        modes = [getattr(e, "isolation", "process") or "process" for e in self.envs.values()]
        self.isolation = max(modes, key=lambda m: ISOLATION_ORDER.index(m) if m in ISOLATION_ORDER else 2)

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"mixture:{split}:{seed}")
        streams = {label: iter(env.tasks(split, seed)) for label, env in self.envs.items()}
        weights = dict(zip(self.labels, self.weights, strict=True))
        while streams:
            label = rng.choices(list(streams), weights=[weights[k] for k in streams])[0]
            task = next(streams[label], None)
            if task is None:
                del streams[label]
                continue
            yield Task(f"{label}/{task.id}", task.question, task.answer, task.solution, task.difficulty,
                       {**task.meta, "source": label, "source_id": task.id})

    def source_task(self, task: Task) -> tuple[Any, Task]:
        """The task's source environment and the task as that source made it."""
        meta = {k: v for k, v in task.meta.items() if k not in ("source", "source_id")}
        return self.envs[task.meta["source"]], Task(task.meta["source_id"], task.question, task.answer,
                                                    task.solution, task.difficulty, meta)

    def prompt(self, task: Task) -> list[Message] | str:
        env, own = self.source_task(task)
        return env.prompt(own)

    def score(self, task: Task, completion: str) -> Score:
        env, own = self.source_task(task)
        return env.score(own, completion)

    def easier(self, task: Task) -> Task | None:
        env, own = self.source_task(task)
        easier = env.easier(own) if hasattr(env, "easier") else None
        if easier is None:
            return None
        label = task.meta["source"]
        return Task(f"{label}/{easier.id}", easier.question, easier.answer, easier.solution, easier.difficulty,
                    {**easier.meta, "source": label, "source_id": easier.id})
