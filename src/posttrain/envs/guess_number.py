"""Guess the number: a multi-turn task. The model guesses, the environment answers "higher" or "lower" until the
guess is right or the turns run out. Binary search solves 1..16 in at most 4 guesses; a model that ignores the
feedback needs 8 on average.

Reward: 1 − turn_cost × (guesses − 1) when found (at least 0), else 0; `correct` = found. The guess is the last integer
of the reply's answer ("I guess 8" guesses 8); a reply without one costs a turn and is answered "Reply with one
number from 1 to N."
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from posttrain.envs.base import check_split, extract_answer, split_of
from posttrain.envs.multiturn import Turn
from posttrain.envs.registry import register_env
from posttrain.records import Message, Task


@register_env("guess_number")
class GuessNumber:
    """Multi-turn: find a secret number from higher/lower feedback (1..hi, at most max_turns guesses)."""

    name = "guess_number"
    isolation = "inline"

    def __init__(self, hi: int = 16, max_turns: int = 6, turn_cost: float = 0.1):
        if hi < 2:
            raise ValueError(f"hi must be >= 2, got {hi}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.hi, self.max_turns, self.turn_cost = hi, max_turns, turn_cost

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"guess_number:{split}:{seed}")
        i = 0
        while True:
            i += 1
            secret = rng.randint(1, self.hi)
            key = f"guess{self.hi}:{secret}:{seed}:{i}"
            if split_of(key) != split:
                continue
            yield Task(id=key, question=f"Guess my number from 1 to {self.hi}.", answer=str(secret),
                       solution=str(secret), difficulty=self.hi.bit_length())

    def prompt(self, task: Task) -> list[Message]:
        return [{"role": "user", "content": task.question}]

    def reset(self, task: Task) -> dict[str, Any]:
        return {"guesses": 0}

    def step(self, task: Task, state: dict[str, Any], action: str) -> Turn:
        guesses = state["guesses"] + 1
        numbers = re.findall(r"-?\d+", extract_answer(action))  # "I guess 8" guesses 8
        secret = int(task.answer)
        if numbers and int(numbers[-1]) == secret:
            return Turn(None, max(0.0, 1.0 - self.turn_cost * (guesses - 1)), True, True, {"guesses": guesses})
        out_of_turns = guesses >= self.max_turns
        if not numbers:
            feedback = f"Reply with one number from 1 to {self.hi}."
        else:
            feedback = "higher" if int(numbers[-1]) < secret else "lower"
        return Turn(None if out_of_turns else feedback, 0.0, out_of_turns, False, {"guesses": guesses})
