"""Task samplers: where an RL stage's prompts come from, step after step, resumably.

    sampler = SAMPLERS.get("uniform")(env, 0)           # (env, seed, **sampler_args)
    tasks = sampler.next(32)                        # the next 32 training tasks
    sampler.observe(outcomes, step=12)              # how each sampled group did (pass rate, rewards)
    state = sampler.state_dict()                    # in every checkpoint; load_state_dict resumes exactly

Every sampler keeps the per-prompt learning history (`PromptHistory`: every visit's step and pass rate, first step
solved, times sampled), written to the run's prompts.jsonl; a curriculum reads it to decide what to sample next.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import Field

from posttrain.errors import UserError
from posttrain.records import Task
from posttrain.registry import Registry


@dataclass(frozen=True)
class GroupOutcome:
    """How the samples of one prompt did."""

    task: Task
    rewards: tuple[float, ...]
    correct: tuple[bool, ...]

    @property
    def pass_rate(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


class TaskSampler(Protocol):
    history: PromptHistory

    def next(self, n: int) -> list[Task]: ...

    def observe(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# "uniform" is below; the curricula (data/curricula.py, built on the classes here) register themselves when their
# module is imported, which the registry does on its first lookup.
SAMPLERS: Registry[Any] = Registry("task sampler", builtin_modules=("posttrain.data.curricula",))


class PromptHistory:
    """Per-prompt learning history, keyed by task id."""

    def __init__(self) -> None:
        self.prompts: dict[str, dict[str, Any]] = {}

    def record(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None:
        for o in outcomes:
            h = self.prompts.setdefault(o.task.id, {"id": o.task.id, "difficulty": o.task.difficulty, "visits": [],
                                                    "first_solved_step": None, "times_sampled": 0})
            h["visits"].append([step, o.pass_rate])
            h["times_sampled"] += len(o.correct)
            if o.pass_rate > 0 and h["first_solved_step"] is None:
                h["first_solved_step"] = step

    def rows(self) -> list[dict[str, Any]]:
        return list(self.prompts.values())

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts = state["prompts"]


MAX_REPEATS = 1000  # a stream that yields only known tasks this many times in a row counts as used up


def distinct_tasks(stream: Iterator[Task], limit: int = 0) -> Iterator[Task]:
    """The stream without repeated ids, ending after `limit` tasks (0: no limit) or once it has yielded only
    known tasks MAX_REPEATS times in a row (a procedural environment with fewer distinct tasks than asked for)."""
    seen: set[str] = set()
    repeats = 0
    for task in stream:
        if task.id in seen:
            repeats += 1
            if repeats >= MAX_REPEATS:
                return
            continue
        repeats = 0
        seen.add(task.id)
        yield task
        if limit and len(seen) >= limit:
            return


def task_stream(env: Any, seed: int, pool_size: int = 0) -> Iterator[Task]:
    """Training tasks forever: a finite dataset is replayed epoch after epoch in a fresh order. pool_size = N:
    the environment's first N distinct tasks (seed `seed`), every epoch in a fresh seeded order."""
    if pool_size:
        tasks = list(distinct_tasks(env.tasks("train", seed), pool_size))
        if not tasks:
            raise UserError(f"environment {env.name!r} yields no training tasks")
        for epoch in itertools.count():
            order = list(range(len(tasks)))
            random.Random(f"pool:{seed}:{epoch}").shuffle(order)
            yield from (tasks[i] for i in order)
    for epoch in itertools.count():
        empty = True
        for task in env.tasks("train", seed + epoch):
            empty = False
            yield task
        if empty:
            raise UserError(f"environment {env.name!r} yields no training tasks")


@SAMPLERS.register("uniform")
class UniformSampler:
    """The environment's training tasks in its own seeded order, every task once per epoch (pool_size = N: epochs
    over a fixed pool of its first N distinct tasks, as the curricula's pool_size)."""

    def __init__(self, env: Any, seed: int, *, pool_size: Annotated[int, Field(ge=0)] = 0) -> None:
        self.env, self.seed, self.pool_size = env, seed, pool_size
        self.history = PromptHistory()
        self._consumed = 0
        self._stream = task_stream(env, seed, pool_size)

    def next(self, n: int) -> list[Task]:
        tasks = list(itertools.islice(self._stream, n))
        self._consumed += len(tasks)
        return tasks

    def observe(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None:
        self.history.record(outcomes, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self._consumed, "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stream = itertools.islice(task_stream(self.env, self.seed, self.pool_size), state["consumed"], None)
        self._consumed = state["consumed"]
        self.history.load_state_dict(state["history"])

