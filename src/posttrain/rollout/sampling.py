"""Choosing the next token: temperature, top-k, top-p, greedy. Returns the token and its logprob under the
temperature-scaled distribution (what the learner recomputes), not under the truncated sampling distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(logits: Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """logits (N, V) fp32 -> tokens (N,), logprobs (N,). temperature 0 means greedy (logprob at temperature 1)."""
    scaled = logits / temperature if temperature > 0 else logits
    logprobs = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = logprobs.argmax(-1)
    else:
        masked = logprobs
        if top_k > 0 and top_k < logits.shape[-1]:
            kth = torch.topk(masked, top_k, dim=-1).values[:, -1:]
            masked = masked.masked_fill(masked < kth, float("-inf"))
        if top_p < 1.0:
            sorted_lp, order = torch.sort(masked, dim=-1, descending=True)
            cum = sorted_lp.softmax(-1).cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
            drop_sorted = (cum - sorted_lp.softmax(-1)) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            masked = masked.masked_fill(drop, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
