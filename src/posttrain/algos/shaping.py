"""Reward shaping and per-group statistics over the samples of one prompt.

Groups are identified by ``group_ids`` (B,) long: samples with the same id answered the same prompt. Groups need
not be contiguous nor of equal size (after filtering or with variable n per prompt they are neither).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupStats:
    """Statistics of each sample's group, broadcast back to the samples: every field is (B,).

    std is the unbiased (n-1) sample std, as ``torch.std`` and TRL use; a singleton group has std 0.
    """

    mean: Tensor
    std: Tensor
    min: Tensor
    max: Tensor
    size: Tensor  # (B,) long


def group_stats(values: Tensor, group_ids: Tensor) -> GroupStats:
    """Mean, unbiased std, min, max and size of the group of every sample. values (B,), group_ids (B,)."""
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must be equal (B,)")
    values = values if values.is_floating_point() else values.float()
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,) dense group index
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    size = torch.bincount(inv, minlength=n_groups)  # (G,)
    sums = values.new_zeros(n_groups).index_add_(0, inv, values)
    mean = (sums / size)[inv]  # (B,)
    sq = values.new_zeros(n_groups).index_add_(0, inv, (values - mean) ** 2)
    # (n-1) denominator; clamping to 1 makes a singleton's std 0 instead of NaN (its deviation is exactly 0).
    std = (sq / (size - 1).clamp(min=1)).sqrt()[inv]
    lo = values.new_zeros(n_groups).scatter_reduce(0, inv, values, reduce="amin", include_self=False)[inv]
    hi = values.new_zeros(n_groups).scatter_reduce(0, inv, values, reduce="amax", include_self=False)[inv]
    return GroupStats(mean=mean, std=std, min=lo, max=hi, size=size[inv])


def group_has_variance(rewards: Tensor, group_ids: Tensor, *, tol: float = 1e-6) -> Tensor:
    """(B,) bool: True where the sample's group has max - min > tol.

    DAPO dynamic sampling (arXiv 2503.14476, §3.2) and ScaleRL zero-variance filtering (arXiv 2510.13786, §4)
    drop groups whose rewards are all equal: their group-relative advantage is 0 and they only dilute the batch.
    Comparing the range to ``tol`` (rather than counting correct answers) makes it work for continuous rewards.
    """
    stats = group_stats(rewards, group_ids)
    return (stats.max - stats.min) > tol


def overlong_penalty(lengths: Tensor, *, max_len: int, cache: int) -> Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476, §3.4), added to the task reward. (B,) -> (B,).

    0 up to ``max_len - cache`` tokens, then linear down to -1 at ``max_len``, and -1 beyond.
    DAPO uses max_len = 20480, cache = 4096.
    """
    if not 0 <= cache <= max_len:
        raise ValueError(f"overlong_penalty needs 0 <= cache <= max_len, got cache={cache}, max_len={max_len}")
    lengths = lengths.to(torch.float32)
    free = max_len - cache
    if cache == 0:
        return torch.where(lengths > max_len, -1.0, 0.0)
    ramp = (free - lengths) / cache
    return torch.where(lengths <= free, 0.0, torch.where(lengths <= max_len, ramp, -1.0))
