"""A custom reward: arithmetic, but every character beyond the answer costs 0.05.

Named in the recipe as env.name = "short_answers.py:ShortAnswers" (a file path relative to the recipe).
"""

from dataclasses import replace

from posttrain.envs.arithmetic import Arithmetic


class ShortAnswers(Arithmetic):
    def score(self, task, completion):
        verdict = super().score(task, completion)  # exact answer check: reward 1 or 0, `correct` for pass@k
        extra = max(0, len(completion.strip()) - len(task.answer))
        return replace(verdict, reward=verdict.reward - 0.05 * extra, info={**verdict.info, "extra_chars": extra})
