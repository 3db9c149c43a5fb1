"""Typed records that cross component boundaries. Frozen dataclasses, never string-keyed dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]  # {"role": "user", "content": "..."}; the chat-template input format of transformers


@dataclass(frozen=True)
class Task:
    """One problem of an environment.

    question: what the model is asked (rendered into a prompt by `Environment.prompt`).
    answer:   the reference answer the verifier compares against (task-specific, usually a string).
    solution: a gold completion (worked solution ending in the answer) used as the SFT target.
    difficulty: the environment's difficulty knob for this task (digits, composition depth, ...).
    """

    id: str
    question: str
    answer: Any
    solution: str
    difficulty: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """The verifier's verdict on one completion. `reward` is what RL optimises; `correct` is what pass@k counts."""

    reward: float
    correct: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int = 0
    first_row: int = 0  # the batch row of prompts[0]: a batch split over engines keeps each row's random stream
                        # (rollout/sampling.py), so every split draws the same samples
    ignore_eos: bool = False  # stop tokens do not end a completion: exactly max_new_tokens each (benchmarks)


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    logprobs[t] is the sampler's log-probability of token_ids[t] under the temperature-scaled distribution
    (before top-p/top-k truncation), the same quantity the learner recomputes; see rollout/local.py.
    policy_version is the version of the weights the engine sampled with (the global step that produced them).
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    text: str
    policy_version: int = 0
    # A multi-turn episode (rollout/episodes.py): 1 on the policy's tokens, 0 on the environment's (which never
    # train and whose logprobs are 0); None: every token is the policy's.
    policy_mask: tuple[int, ...] | None = None
