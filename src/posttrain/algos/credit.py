"""Credit assignment for multi-turn episodes: which advantage each policy token of an episode gets.

    advantages = CREDIT.get(c.credit)(credit_inputs, estimator, **c.credit_args)     # recipes/rl.py

``fn(x: CreditInputs, estimator: (AdvantageInputs) -> (B, T), **hyperparameters) -> advantages (B, T)``, zero
where x.base.mask = 0. `estimator` is the recipe's advantage estimator with its hyperparameters bound, so every
credit rule works with every estimator. A single-turn sample is a one-turn episode: under every entry it gets
exactly what the estimator alone gives it.

An episode's turn rewards sum to its reward; whatever of the episode's reward the turns do not account for
(shaping such as the overlong penalty, or a reward control that replaced the verifier's reward) counts at its
last turn, so `episode` and `per_turn` with gamma = 1 see the same total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Protocol

import torch
from pydantic import Field
from torch import Tensor

from posttrain.algos.inputs import AdvantageInputs
from posttrain.registry import Registry

Estimator = Callable[[AdvantageInputs], Tensor]


@dataclass(frozen=True)
class CreditInputs:
    base: AdvantageInputs  # the step's inputs: rewards = each episode's reward (B,), mask on its policy tokens
    turn_rewards: Sequence[Sequence[float]]  # per sample, its turns' rewards in order (single-turn: [reward])
    turn_index: Tensor  # (B, T) long: which policy turn (0, 1, ...) each token belongs to; -1 elsewhere

    def __post_init__(self) -> None:
        if len(self.turn_rewards) != self.base.rewards.shape[0]:
            raise ValueError(f"CreditInputs: {len(self.turn_rewards)} turn-reward lists for "
                             f"{self.base.rewards.shape[0]} samples")
        if tuple(self.turn_index.shape) != tuple(self.base.mask.shape):
            raise ValueError(f"CreditInputs.turn_index has shape {tuple(self.turn_index.shape)}, expected "
                             f"{tuple(self.base.mask.shape)} like mask")

    def settled_turn_rewards(self) -> list[list[float]]:
        """Each sample's turn rewards with the unaccounted part of its reward added to the last turn."""
        out = []
        for r, turns in zip(self.base.rewards.tolist(), self.turn_rewards, strict=True):
            turns = list(turns) or [0.0]
            turns[-1] += r - sum(turns)
            out.append(turns)
        return out


class CreditFn(Protocol):
    def __call__(self, x: CreditInputs, estimator: Estimator, **hyperparameters: object) -> Tensor: ...


CREDIT: Registry[CreditFn] = Registry("credit")


@CREDIT.register("episode")
def episode(x: CreditInputs, estimator: Estimator) -> Tensor:
    """The episode's reward (the sum of its turns') through the estimator, the same value on every policy token of
    the episode (verl's agent loop, SkyRL, TRL: the outcome reward credits every action)."""
    return estimator(x.base)


def returns_to_go(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = sum_{k >= t} gamma^(k - t) r_k for every turn t."""
    out, g = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


@CREDIT.register("per_turn")
def per_turn(x: CreditInputs, estimator: Estimator, *,
             gamma: Annotated[float, Field(ge=0, le=1, description="discount per turn of the return-to-go")] = 1.0,
             ) -> Tensor:
    """Turn t's tokens get the estimator's advantage of their discounted return-to-go G_t = sum_{k>=t} gamma^(k-t)
    r_k, computed among the episodes of the same group that reached turn t (a turn-level baseline: a late turn is
    compared with the other episodes that were still going). An episode that is alone at turn t in its group
    gets a group-relative estimator's 0 there. With one turn per episode this is the estimator alone."""
    to_go = [returns_to_go(r, gamma) for r in x.settled_turn_rewards()]
    out = torch.zeros_like(x.base.mask)
    for t in range(max(len(g) for g in to_go)):
        rows = torch.tensor([i for i, g in enumerate(to_go) if len(g) > t], dtype=torch.long)
        returns = torch.tensor([to_go[i][t] for i in rows.tolist()], dtype=torch.float)
        mask = x.base.mask[rows] * (x.turn_index[rows] == t).to(x.base.mask.dtype)
        sub = replace(x.base, rewards=returns, group_ids=x.base.group_ids[rows], mask=mask,
                      **{k: getattr(x.base, k)[rows] for k in ("token_rewards", "values", "logprobs",
                                                               "teacher_logprobs")
                         if getattr(x.base, k) is not None})
        out[rows] += estimator(sub) * mask
    return out


def turn_index(policy_masks: Sequence[Sequence[int] | None], lengths: Sequence[int], width: int) -> Tensor:
    """(B, width) long: the index of the run of policy tokens (the turn) each token is in, -1 on environment
    tokens and padding; a sample without a policy mask (single-turn) is all turn 0."""
    out = torch.full((len(lengths), width), -1, dtype=torch.long)
    for row, (mask, n) in enumerate(zip(policy_masks, lengths, strict=True)):
        if mask is None:
            out[row, :n] = 0
            continue
        turn, previous = -1, 0
        for j, m in enumerate(mask[:width]):
            if m and not previous:
                turn += 1
            if m:
                out[row, j] = turn
            previous = m
    return out
