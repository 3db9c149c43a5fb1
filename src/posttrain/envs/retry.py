"""Retry with feedback: any single-turn environment made multi-turn. A wrong answer hears "Wrong, try again." and
gets another turn, up to max_turns; a right answer on try t earns decay^(t-1). The inner environment's verifier
judges every answer and its isolation is this environment's, so a third-party verifier stays in its workers.

    [env]
    name = "retry_with_feedback"
    args = { env = "arithmetic", args = { digits = 3 }, max_turns = 3 }
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from posttrain.envs.multiturn import Turn, is_multi_turn
from posttrain.envs.registry import make_env
from posttrain.records import Message, Task


class RetryWithFeedback:
    """Multi-turn: a single-turn environment with "try again" feedback (env, args, max_turns, decay, feedback)."""

    name = "retry_with_feedback"

    def __init__(self, env: str = "arithmetic", args: dict[str, Any] | None = None, max_turns: int = 3,
                 decay: float = 0.5, feedback: str = "Wrong, try again."):
        self.inner = make_env(env, args or {})
        if is_multi_turn(self.inner):
            raise ValueError(f"env {env!r} is already multi-turn")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.max_turns, self.decay, self.feedback = max_turns, decay, feedback
        # the inner verifier's trust level is this environment's (an instance attribute: envs/scoring.py)
        self.isolation = vars(type(self.inner)).get("isolation") or "process"

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        return self.inner.tasks(split, seed)

    def prompt(self, task: Task) -> list[Message] | str:
        return self.inner.prompt(task)

    def reset(self, task: Task) -> dict[str, Any]:
        return {"tries": 0}

    def step(self, task: Task, state: dict[str, Any], action: str) -> Turn:
        tries = state["tries"] + 1
        if self.inner.score(task, action).correct:
            return Turn(None, self.decay ** (tries - 1), True, True, {"tries": tries})
        done = tries >= self.max_turns
        return Turn(None if done else self.feedback, 0.0, done, False, {"tries": tries})
