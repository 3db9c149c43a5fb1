"""The Environment protocol (a task source plus its verifier) and the split rule shared by procedural tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from posttrain.records import Message, Score, Task

SPLITS = ("train", "eval")


@runtime_checkable
class Environment(Protocol):
    """A source of tasks with a verifiable reward.

    `score` is the single scoring function used both for RL rewards and for evaluation. It must be deterministic;
    the caller runs it in a worker with a timeout (see envs/scoring.py), so it may be slow but must not be trusted.
    """

    name: str

    def tasks(self, split: str, seed: int) -> Iterator[Task]: ...

    def prompt(self, task: Task) -> list[Message] | str: ...

    def score(self, task: Task, completion: str) -> Score: ...


def split_of(key: str, eval_fraction: float = 0.1) -> str:
    """Assign a problem to a split by a stable hash of its canonical text, so train and eval never overlap
    whatever the seed or the order of generation."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
