"""The multi-turn environment protocol: the model acts, the environment answers, until done or out of turns.

    class GuessNumber:                                   # envs/guess_number.py, the built-in example
        name = "guess_number"
        max_turns = 6
        max_episode_tokens = None                        # optional: a token budget per episode, prompt included
        stop = "</calc>"                                 # optional: a string (or a list) ending the policy's turn
        max_observation_chars = 1_000_000                # optional: a longer observation ends its episode
        def tasks(self, split, seed) -> Iterator[Task]: ...
        def prompt(self, task) -> list[Message] | str: ...                  # the first observation
        def reset(self, task) -> dict: ...                                  # a fresh episode state
        def step(self, task, state, action: str) -> Turn: ...               # one action -> feedback

An environment is multi-turn when it has `reset` and `step`; everything else in posttrain (samplers, mixtures,
evaluation suites, the RL step) takes it like a single-turn one. rollout/episodes.py runs the episodes
token-in, token-out: each turn continues from the exact tokens already sampled, the environment's answer is
tokenised once and appended, and only the policy's tokens train. `reset` and `step` must be deterministic and
fast; both run isolated like the verifier (envs/scoring.py `reset_many`, `step_many`), and one that raises, hangs
or returns a malformed Turn ends its episode with reward 0 (`info["error"]`), never the run. The episode
attributes (`max_turns`, `stop`, `max_episode_tokens`, `max_observation_chars`) are checked once by
`episode_rules`: a wrong one is a UserError naming the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import UserError
from posttrain.records import Message, Task

MAX_OBSERVATION_CHARS = 1_000_000  # 1 MB of text: ~250k tokens, past any context; 24 MB once exhausted memory


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


@dataclass(frozen=True)
class EpisodeRules:
    """A multi-turn environment's episode attributes, checked (`episode_rules`)."""

    max_turns: int
    stop: tuple[str, ...]  # strings that end the policy's turn, beside the sampling params' own
    max_episode_tokens: int | None  # the environment's own token budget per episode (prompt included)
    max_observation_chars: int  # an observation longer than this ends its episode (reason "bad_turn")


def episode_rules(env: object) -> EpisodeRules:
    """The environment's `max_turns` (a positive int), `stop` (a str is one stop string, else a list of non-empty
    strings), `max_episode_tokens` (a positive int or None) and `max_observation_chars` (a positive int); a wrong
    one is a UserError naming the environment and the value."""
    name = getattr(env, "name", type(env).__name__)

    def positive_int(attr: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"environment {name!r}: {attr} must be a positive int, got {value!r}")
        return value

    stop = getattr(env, "stop", None) or ()
    stop = (stop,) if isinstance(stop, str) else stop  # "</tool>" is one stop string, not 7 one-character ones
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"environment {name!r}: stop must be a string or a list of non-empty strings, "
                        f"got {stop!r}")
    budget = getattr(env, "max_episode_tokens", None)
    return EpisodeRules(positive_int("max_turns", getattr(env, "max_turns", None)), tuple(stop),
                        None if budget is None else positive_int("max_episode_tokens", budget),
                        positive_int("max_observation_chars",
                                     getattr(env, "max_observation_chars", MAX_OBSERVATION_CHARS)))
