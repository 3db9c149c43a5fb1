"""Multi-digit arithmetic with an exact verifier. Difficulty = number of digits of the operands."""

from __future__ import annotations

import random
from collections.abc import Iterator

from posttrain.envs.base import check_split, split_of
from posttrain.envs.registry import register_env
from posttrain.records import Message, Score, Task


def _digits_range(digits: int | list[int]) -> tuple[int, int]:
    lo, hi = (digits, digits) if isinstance(digits, int) else tuple(digits)
    if not 1 <= lo <= hi:
        raise ValueError(f"digits must be >= 1 and ordered, got {digits!r}")
    return lo, hi


@register_env("arithmetic")
class Arithmetic:
    """`a+b=` with an exact integer answer. `digits` is an int or an inclusive [min, max] range."""

    name = "arithmetic"

    def __init__(self, digits: int | list[int] = 3, ops: str = "+"):
        self.digits = _digits_range(digits)
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
        self.ops = ops

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"arithmetic:{split}:{seed}")
        while True:
            d = rng.randint(*self.digits)
            a = rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
            b = rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
            op = rng.choice(self.ops)
            question = f"{a}{op}{b}="
            if split_of(question) != split:
                continue
            answer = str({"+": a + b, "-": a - b, "*": a * b}[op])
            yield Task(id=question, question=question, answer=answer, solution=answer, difficulty=d)

    def prompt(self, task: Task) -> list[Message]:
        return [{"role": "user", "content": task.question}]

    def score(self, task: Task, completion: str) -> Score:
        got = completion.strip()
        ok = got == task.answer
        return Score(reward=1.0 if ok else 0.0, correct=ok, info={} if ok else {"got": got[:50]})
