"""Verifiers in a Ray pool: with [distributed] backend = "ray" the rl stage's completions are scored by Ray tasks
spread over the cluster, each running the ordinary score_many (its sandbox, timeouts and failure handling) on a
slice of the batch. The driver keeps the run's limits (Scorer: the error-fraction stop, the failure lines).

Scoring tasks reserve no CPU (num_cpus=0): the rollout actors hold the cluster's CPUs, and a scoring task that
waited for one would wait for ever. Before Ray is started (evaluation at the start of a run, a stage without Ray
workers) the same call scores in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from posttrain.envs.scoring import score_many
from posttrain.records import Score, Task


@ray.remote(num_cpus=0)
def _score_slice(env: Any, tasks: Sequence[Task], texts: Sequence[str], timeout_s: float,
                 failure_reward: float) -> list[Score]:
    return score_many(env, tasks, texts, timeout_s=timeout_s, failure_reward=failure_reward)


class RayScoring:
    """A Scorer.score_fn: `parts` Ray tasks per call. `remote_calls` counts the calls that went to Ray."""

    def __init__(self, parts: int):
        self.parts = max(1, parts)
        self.remote_calls = 0

    def __call__(self, env: Any, tasks: Sequence[Task], texts: Sequence[str], *, timeout_s: float,
                 failure_reward: float) -> list[Score]:
        if not ray.is_initialized() or not tasks:
            return score_many(env, tasks, texts, timeout_s=timeout_s, failure_reward=failure_reward)
        self.remote_calls += 1
        env_ref = ray.put(env)
        size = -(-len(tasks) // self.parts)
        refs = [_score_slice.remote(env_ref, list(tasks[i:i + size]), list(texts[i:i + size]), timeout_s,
                                    failure_reward) for i in range(0, len(tasks), size)]
        return [s for chunk in ray.get(refs) for s in chunk]


