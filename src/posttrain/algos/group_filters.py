"""Group filters: which groups of a step's rollouts enter the update. ``fn(rewards (B,), group_ids (B,)) -> keep (B,)``.

A filter with trait ``refill=True`` asks the rollout collector for more prompts until the step holds
`prompts_per_step` kept groups (or its refill rounds run out), as DAPO's dynamic sampling does.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from posttrain.algos.shaping import group_has_variance
from posttrain.registry import Registry


class GroupFilterFn(Protocol):
    def __call__(self, rewards: Tensor, group_ids: Tensor) -> Tensor: ...


GROUP_FILTERS: Registry[GroupFilterFn] = Registry("group filter")


@GROUP_FILTERS.register("none")
def none(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Keep every group."""
    return torch.ones_like(group_ids, dtype=torch.bool)


@GROUP_FILTERS.register("zero_variance")
def zero_variance(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Drop groups whose rewards are all equal: their group-relative advantage is 0 and they only dilute the batch
    (ScaleRL zero-variance filtering, arXiv 2510.13786, §4: the effective batch, no resampling)."""
    return group_has_variance(rewards, group_ids)


@GROUP_FILTERS.register("dynamic_sampling", refill=True)
def dynamic_sampling(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling (arXiv 2503.14476, §3.2): drop zero-variance groups and sample more prompts until
    the batch is full."""
    return group_has_variance(rewards, group_ids)
