"""A multi-turn environment in a few lines: additions where a wrong answer hears "Wrong, try again." and gets
another turn, three in all. The reward halves with every extra try, so RL prefers a right first answer."""

from posttrain.envs.arithmetic import Arithmetic
from posttrain.envs.multiturn import Turn


class RetryArithmetic:
    name = "retry_arithmetic"
    max_turns = 3

    def __init__(self, digits: int = 2):
        self.inner = Arithmetic(digits=digits)  # its tasks, prompts and verifier

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
