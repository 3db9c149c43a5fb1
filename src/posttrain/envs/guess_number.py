"""Guess the number: a multi-turn task. The model guesses, the environment answers "higher" or "lower" until the
guess is right or the turns run out. Binary search solves 1..16 in at most 5 guesses (3.4 on average); guessing
at random without the feedback finds it within 6 guesses only 32% of the time.

Reward: 1 − turn_cost × (guesses − 1) when found (at least 0), else 0; `correct` = found. The guess is the last integer
of the reply's answer ("I guess 8" guesses 8); a reply without one costs a turn and is answered "Reply with one
number from 1 to N."

SFT data (`demonstration`): whole episodes of a policy that, with probability `demo_skill`, guesses uniformly
among the numbers the feedback still allows, and otherwise uniformly among all N ignoring it. Neither is binary
search, so a warm-up on them leaves RL something to learn (fewer turns, more episodes solved).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from posttrain.envs.base import check_split, extract_answer, split_of
from posttrain.envs.multiturn import Turn
from posttrain.records import Message, Task


class GuessNumber:
    """Multi-turn: find a secret number from higher/lower feedback (1..hi, at most max_turns guesses)."""

    name = "guess_number"
    isolation = "inline"

    def __init__(self, hi: int = 16, max_turns: int = 6, turn_cost: float = 0.1, demo_skill: float = 0.5):
        if not 0 <= demo_skill <= 1:
            raise ValueError(f"demo_skill must be in [0, 1], got {demo_skill}")
        self.demo_skill = demo_skill
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

    def demonstration(self, task: Task, rng: random.Random) -> list[Message]:
        """A whole episode for SFT (see the module docstring), its feedback from `step`."""
        messages: list[Message] = [*self.prompt(task)]
        lo, hi, state = 1, self.hi, self.reset(task)
        use_feedback = rng.random() < self.demo_skill
        for _ in range(self.max_turns):
            guess = rng.randint(lo, hi) if use_feedback else rng.randint(1, self.hi)
            messages.append({"role": "assistant", "content": str(guess)})
            turn = self.step(task, state, str(guess))
            if turn.done or turn.observation is None:
                break
            lo, hi = (guess + 1, hi) if turn.observation == "higher" else (lo, guess - 1)
            messages.append({"role": "user", "content": turn.observation})
            state = turn.state
        return messages
