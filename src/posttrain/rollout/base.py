"""The rollout engine protocol. The local engine (hf.py) and GPU engines (vLLM) implement the same two calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor

from posttrain.records import Completion, SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt (repeat a prompt to sample a group). Completions carry the sampler's
        per-token logprobs (temperature-scaled distribution) and a finish reason."""
        ...

    def update_weights(self, state: Mapping[str, Tensor], version: int) -> None:
        """Load new policy weights (no-op for an engine that shares the learner's module)."""
        ...
