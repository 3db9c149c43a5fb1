"""Per-token log-probabilities and entropy from logits, in fp32 whatever the model's compute dtype.

Both the rollout engine and the learner call `token_logprobs`, so the sampler's and the trainer's numbers are the
same function of the logits (temperature included, top-p/top-k not: those only shape sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[targets].  logits (B, T, V), targets (B, T) -> (B, T), fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position. (B, T, V) -> (B, T), fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
