"""Environments whose verifiers misbehave, loaded by import path ("hostile_envs:Name") in reliability tests."""

from __future__ import annotations

import time

from posttrain.envs.arithmetic import Arithmetic
from posttrain.records import Score, Task


class FlakyArithmetic(Arithmetic):
    """Raises for one task in 8, returns a NaN reward for another; otherwise exact. No `isolation` attribute:
    it gets worker processes like any third-party verifier."""

    isolation = "inline"

    def score(self, task: Task, completion: str) -> Score:
        h = sum(map(ord, task.id + completion)) % 8
        if h == 0:
            raise RuntimeError("verifier bug")
        if h == 1:
            return Score(float("nan"), False)
        return super().score(task, completion)


class BrokenArithmetic(Arithmetic):
    isolation = "inline"

    def score(self, task: Task, completion: str) -> Score:
        raise ValueError("always broken")


class HangingArithmetic(Arithmetic):
    """Hangs forever on a quarter of the completions. Declares no isolation (inherits none), so the scoring pool
    runs it in killable worker processes."""

    def score(self, task: Task, completion: str) -> Score:
        if sum(map(ord, task.id + completion)) % 4 == 0:
            while True:
                time.sleep(1)
        return super().score(task, completion)


HangingArithmetic.isolation = "process"  # explicit: what an undeclared env gets by default


class Empty(Arithmetic):
    isolation = "inline"

    def tasks(self, split, seed):
        return iter(())


class Verbose(Arithmetic):
    """Questions far longer than the tiny model's context."""

    isolation = "inline"

    def tasks(self, split, seed):
        for t in super().tasks(split, seed):
            yield Task(id=t.id, question="1" * 2000 + t.question, answer=t.answer, solution=t.solution)


class ParityReward(Arithmetic):
    """Reward 1 when the completion has an even length: untrained models get mixed groups, so advantages are a
    mix of zero and non-zero (for tests of the training loop, not a task to learn)."""

    isolation = "inline"

    def score(self, task: Task, completion: str) -> Score:
        ok = len(completion) % 2 == 0
        return Score(1.0 if ok else 0.0, ok)


class AlwaysCorrect(Arithmetic):
    """Every completion is correct (reward 1): for tests of what happens when nothing fails."""

    isolation = "inline"

    def score(self, task: Task, completion: str) -> Score:
        return Score(1.0, True)
