"""A custom reward: arithmetic, but every character beyond the answer costs 0.05.

Named in the recipe as env.name = "short_answers.py:ShortAnswers" (a file path relative to the recipe).
Its SFT data echoes the question in half of the demonstrations ("3+4=7", which the verifier accepts), as data
from another source often does; the reward prefers the bare "7", and RL is what teaches the model to drop the echo.
"""

import random
from dataclasses import replace

from posttrain.envs.arithmetic import Arithmetic


class ShortAnswers(Arithmetic):
    info_metrics = ("extra_chars",)  # averaged into the run's metrics: rollout/info/extra_chars, eval/info/extra_chars

    def tasks(self, split, seed):
        for task in super().tasks(split, seed):  # the same problems; only the demonstration's wording changes
            echoed = random.Random(task.id).random() < 0.5
            yield replace(task, solution=task.question + task.answer) if echoed else task

    def score(self, task, completion):
        verdict = super().score(task, completion)  # exact answer check: reward 1 or 0, `correct` for pass@k
        extra = max(0, len(completion.strip()) - len(task.answer))
        return replace(verdict, reward=verdict.reward - 0.05 * extra, info={**verdict.info, "extra_chars": extra})
