"""The multi-turn environment protocol: the model acts, the environment answers, until done or out of turns.

    class GuessNumber:                                   # envs/guess_number.py, the built-in example
        name = "guess_number"
        max_turns = 6
        max_episode_tokens = None                        # optional: a token budget per episode, prompt included
        def tasks(self, split, seed) -> Iterator[Task]: ...
        def prompt(self, task) -> list[Message] | str: ...                  # the first observation
        def reset(self, task) -> dict: ...                                  # a fresh episode state
        def step(self, task, state, action: str) -> Turn: ...               # one action -> feedback

An environment is multi-turn when it has `reset` and `step`; everything else in posttrain (samplers, mixtures,
evaluation suites, the RL step) takes it like a single-turn one. rollout/episodes.py runs the episodes
token-in, token-out: each turn continues from the exact tokens already sampled, the environment's answer is
tokenised once and appended, and only the policy's tokens train. `step` must be deterministic and fast; one that
raises ends its episode with reward 0 (`info["error"]`), never the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.records import Message, Task


@dataclass(frozen=True)
class Turn:
    """What the environment says after one action."""

    observation: str | None  # the next user turn; None when the episode is over
    reward: float  # this turn's reward (an episode's reward is the sum of its turns')
    done: bool
    correct: bool = False  # the episode's verdict so far (pass@k counts the final one)
    state: dict[str, Any] = field(default_factory=dict)  # the state the next step sees
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"tool_calls": 1}


@runtime_checkable
class MultiTurnEnvironment(Protocol):
    name: str
    max_turns: int

    def prompt(self, task: Task) -> list[Message] | str: ...

    def reset(self, task: Task) -> dict[str, Any]: ...

    def step(self, task: Task, state: dict[str, Any], action: str) -> Turn: ...


def is_multi_turn(env: object) -> bool:
    return callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))
