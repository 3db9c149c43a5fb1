"""RLP, reinforcement as a pretraining objective (arXiv 2510.01265; ALGORITHMS.md §11): the pure maths.

At a position t of a document the policy writes a thought c; its reward is the information gain

    r(c) = log p_θ(x_t.. | x_<t, c) − log p_φ(x_t.. | x_<t)         φ ← τ φ + (1 − τ) θ (an EMA of the policy)

(here the mean over the K target tokens x_t..x_{t+K-1}, so the scale does not grow with K). G thoughts per
position share a baseline: A_i = G/(G−1) · (r_i − mean_j r_j), which equals r_i − mean_{j≠i} r_j, the
leave-one-out baseline (an unbiased one, as the sample's own reward is not in it). Gradients flow through the
thought tokens only: the target tokens give the reward and are masked out of the loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def information_gain(with_thought: Tensor, no_thought: Tensor, mask: Tensor) -> Tensor:
    """(N, K) target-token logprobs with the thought (policy) and without it (EMA baseline), mask (N, K) 1 on real
    target tokens -> (N,) the mean over target tokens of their difference."""
    counts = mask.sum(-1).clamp(min=1)
    return ((with_thought - no_thought) * mask).sum(-1) / counts


def loo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(N,) rewards, (N,) group ids (one group = the G thoughts of one position) -> (N,) advantages
    G/(G−1) · (r − group mean). A group of one gets 0 (it has no baseline)."""
    out = torch.zeros_like(rewards)
    for g in group_ids.unique():
        rows = group_ids == g
        n = int(rows.sum())
        if n > 1:
            r = rewards[rows]
            out[rows] = n / (n - 1) * (r - r.mean())
    return out


def thought_mask(thought_lens: Tensor, width: int) -> Tensor:
    """Rows whose completion is thought tokens followed by target tokens: (N,) thought lengths -> (N, width) 1 on
    each row's thought tokens, 0 on its target tokens and padding (what the loss may push gradient through)."""
    return (torch.arange(width)[None, :] < thought_lens[:, None]).float()


@torch.no_grad()
def ema_update_(ema: Mapping[str, Tensor], params: Mapping[str, Tensor], decay: float) -> None:
    """φ ← decay·φ + (1 − decay)·θ in place, for every floating tensor (integer buffers are copied)."""
    for name, phi in ema.items():
        theta = params[name]
        if phi.is_floating_point():
            phi.mul_(decay).add_(theta.to(phi.dtype), alpha=1 - decay)
        else:
            phi.copy_(theta)


@torch.no_grad()
def relative_distance(ema: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> float:
    """||θ − φ|| / ||θ|| over the floating tensors: how far the EMA baseline lags the policy (0 = not at all)."""
    diff = total = 0.0
    for name, phi in ema.items():
        if phi.is_floating_point():
            theta = params[name].to(phi.dtype)
            diff += float((theta - phi).pow(2).sum())
            total += float(theta.pow(2).sum())
    return (diff / total) ** 0.5 if total > 0 else 0.0
