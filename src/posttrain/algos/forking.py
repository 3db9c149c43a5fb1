"""Forking tokens: train the policy gradient on the high-entropy minority of a batch's tokens only.

Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
Reasoning" (arXiv 2506.01939): in chain-of-thought RL a small fraction of tokens have high entropy, the "forks"
where the reasoning branches, and restricting the policy-gradient update to the top 20% of tokens by entropy
matched or beat the full update. Selected as `rl.forking_fraction = 0.2`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def top_entropy_mask(entropy: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """{0, 1} (like mask): the ceil(fraction x valid tokens) valid tokens of highest entropy (at least one, when
    any is valid), ties broken by position; fraction = 1 keeps every valid token.

    The selection is over the tokens given (the learner's micro-batch), as in the paper's verl code, where the
    entropy percentile is taken in the loss function of each micro-batch."""
    if not 0 < fraction <= 1:
        raise ValueError(f"forking fraction must be in (0, 1], got {fraction}")
    valid = mask.bool()
    n = int(valid.sum())
    if fraction == 1 or n == 0:
        return valid.to(mask.dtype)
    k = max(1, math.ceil(fraction * n))
    scores = torch.where(valid, entropy.detach().float(), torch.full_like(entropy, -torch.inf, dtype=torch.float32))
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]
    keep = torch.zeros(valid.numel(), dtype=mask.dtype, device=mask.device)
    keep[order] = 1
    return keep.view_as(mask)
