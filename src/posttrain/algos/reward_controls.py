"""Reward-signal controls: what RL would learn from a reward that is NOT the verifier's (Spurious Rewards,
arXiv 2506.10947; ALGORITHMS.md §14). A control replaces the training reward of every sample and leaves its
`correct` (the verifier's verdict) alone, so pass@1, pass@k and every evaluation still measure correctness.

    [env]
    reward = "random"                 # one of REWARD_CONTROLS; "verifier" (the default) is no control
    reward_args = { rate = 0.5 }

  REWARD_CONTROLS  fn(RewardControlInputs, generator, **hp) -> rewards (B,)

Each entry is a pure function of one call's verifier rewards, correctness and answer-format flags, drawing any
randomness from the torch.Generator it is given (seeded per step and refill round by rollout/collect.py, so a
resumed run draws the same rewards). A gain that survives the random or incorrect control came from the base
model's priors and the update's biases (clipping), not from the reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from posttrain.registry import Registry


@dataclass(frozen=True)
class RewardControlInputs:
    rewards: Tensor  # (B,) float: the verifier's rewards
    correct: Tensor  # (B,) bool: the verifier's verdicts
    formatted: Tensor  # (B,) bool: the completion's answer line parses (envs/scoring.py answer_parses)


REWARD_CONTROLS: Registry = Registry("reward control")

Rate = Annotated[float, Field(ge=0, le=1, description="Probability of reward 1.")]


@REWARD_CONTROLS.register("verifier")
def verifier(x: RewardControlInputs, generator: torch.Generator) -> Tensor:
    """The environment's reward unchanged: no control."""
    return x.rewards


@REWARD_CONTROLS.register("random")
def random(x: RewardControlInputs, generator: torch.Generator, *, rate: Rate = 0.5) -> Tensor:
    """1 with probability `rate`, independently per sample, whatever the completion (the paper's γ)."""
    return (torch.rand(x.rewards.shape, generator=generator) < rate).float()


@REWARD_CONTROLS.register("incorrect")
def incorrect(x: RewardControlInputs, generator: torch.Generator) -> Tensor:
    """1 only when the verifier says the answer is wrong: a reward anti-correlated with correctness."""
    return (~x.correct).float()


@REWARD_CONTROLS.register("format")
def format_only(x: RewardControlInputs, generator: torch.Generator) -> Tensor:
    """1 when the completion's answer line parses (a number where the task's answer is one), right or wrong."""
    return x.formatted.float()


@REWARD_CONTROLS.register("constant")
def constant(x: RewardControlInputs, generator: torch.Generator, *, value: float = 1.0) -> Tensor:
    """The same reward for every sample: every group-relative advantage is 0, so only the non-advantage terms
    (KL, entropy bonus) move the policy. The null control of the advantage itself."""
    return torch.full(x.rewards.shape, float(value))


@REWARD_CONTROLS.register("noisy")
def noisy(x: RewardControlInputs, generator: torch.Generator, *,
          flip: Annotated[float, Field(ge=0, le=1, description="Probability of flipping r to 1 - r.")] = 0.1,
          std: Annotated[float, Field(ge=0, description="Std of Gaussian noise added after flipping.")] = 0.0
          ) -> Tensor:
    """The verifier's reward corrupted: each sample's r becomes 1 - r with probability `flip` (a label-noise
    model for rewards in [0, 1]), then N(0, std^2) is added. flip = 0.5 carries no information."""
    flipped = torch.rand(x.rewards.shape, generator=generator) < flip
    out = torch.where(flipped, 1.0 - x.rewards, x.rewards)
    if std > 0:
        out = out + std * torch.randn(x.rewards.shape, generator=generator)
    return out
