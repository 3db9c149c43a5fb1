"""Sequence-level advantage estimators: ``fn(rewards (B,), group_ids (B,), *, eps) -> (B,)``.

The recipe broadcasts the result to every token of the sample. Convention: every std is the unbiased (n-1)
one, like ``torch.std`` and TRL; a group of size 1 has no baseline and gets advantage 0 wherever the
estimator is group-relative. Estimators that normalise "over the batch" use exactly the tensor they are
given, so call them on the whole rollout batch, never on a micro-batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from posttrain.algos.registry import Registry
from posttrain.algos.shaping import group_stats


class AdvantageFn(Protocol):
    def __call__(self, rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor: ...


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")


def _batch_std(x: Tensor) -> Tensor:
    # Unbiased like the group std; a batch of one sample has no spread, not a NaN.
    return x.std() if x.numel() > 1 else x.new_zeros(())


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300, §4.1): (r - mean_group) / (std_group + eps)."""
    s = group_stats(rewards, group_ids)
    # A singleton has no baseline: 0 explicitly, so eps = 0 cannot turn it into 0/0.
    return torch.where(s.size > 1, (rewards - s.mean) / (s.std + eps), torch.zeros_like(rewards))


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Dr. GRPO (arXiv 2503.20783): r - mean_group. No std division, which up-weighted easy/hard prompts."""
    return rewards - group_stats(rewards, group_ids).mean


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """RLOO (Ahmadian et al., arXiv 2402.14740): r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_group).

    The leave-one-out baseline is independent of r_i, so the estimator stays unbiased.
    """
    s = group_stats(rewards, group_ids)
    n = s.size.to(rewards.dtype)
    loo = rewards - (s.mean * n - rewards) / (n - 1).clamp(min=1)
    return torch.where(s.size > 1, loo, torch.zeros_like(loo))


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262): (r - mean_batch) / (std_batch + eps); groups are ignored."""
    return (rewards - rewards.mean()) / (_batch_std(rewards) + eps)


@ADVANTAGES.register("grpo_batch_std")
def grpo_batch_std(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Group-centred, batch-scaled: (r - mean_group) / (std_batch(r - mean_group) + eps).

    ScaleRL (arXiv 2510.13786, §4 "batch-level advantage normalisation") and LitePPO (arXiv 2508.08221):
    a batch-wide scale keeps the Dr. GRPO centring but does not up-weight low-variance prompts.
    Singleton groups contribute their centred value 0 to the batch std.
    """
    centred = dr_grpo(rewards, group_ids)
    return centred / (_batch_std(centred) + eps)
