"""A multi-turn environment in a few lines: sort a short list of digits, and a wrong answer hears "Wrong, try
again." and gets another turn, three in all. The reward halves with every extra try, so RL prefers a right first
answer."""

from posttrain.envs.multiturn import Turn
from posttrain.envs.sorting import Sorting


class RetrySorting:
    name = "retry_sorting"
    max_turns = 3

    def __init__(self, length: int | list[int] = (3, 5), max_value: int = 9):
        self.inner = Sorting(length=length, max_value=max_value)  # its tasks, prompts and verifier

    def tasks(self, split, seed):
        return self.inner.tasks(split, seed)

    def prompt(self, task):
        return self.inner.prompt(task)

    def reset(self, task):
        return {"tries": 0}

    def step(self, task, state, action):
        tries = state["tries"] + 1
        if self.inner.score(task, action).correct:
            return Turn(None, 0.5 ** (tries - 1), True, True, {"tries": tries})
        done = tries >= self.max_turns
        return Turn(None if done else "Wrong, try again.", 0.0, done, False, {"tries": tries})
