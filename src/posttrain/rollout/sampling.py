"""Choosing the next token: temperature, top-k, top-p, greedy. Returns the token and its logprob under the
temperature-scaled distribution (what the learner recomputes), not under the truncated sampling distribution.

Randomness is per row: row r of a generate call draws from its own generator, seeded by (call seed, r), so a
sample does not depend on which other prompts share its batch. That is what lets a batch split over several
engines (Ray rollout workers) draw exactly the samples one engine would (vLLM seeds each request the same way)."""

from __future__ import annotations

import torch
from torch import Tensor


def row_generators(seed: int, rows: range, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row; row r's stream depends only on (seed, r)."""
    return [torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + r) % (2**63 - 1)) for r in rows]


def uniforms(generators: list[torch.Generator], device: torch.device | str = "cpu") -> Tensor:
    """One U[0, 1) draw from each generator -> (N,)."""
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


def sample_next(logits: Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | list[torch.Generator] | None) -> tuple[Tensor, Tensor]:
    """logits (N, V) fp32 -> tokens (N,), logprobs (N,). temperature 0 means greedy (logprob at temperature 1).
    generator: one for the whole batch, or a list with one per row (row_generators)."""
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
        if isinstance(generator, list):  # inverse CDF with each row's own draw
            cum = probs.cumsum(-1)
            u = uniforms(generator, logits.device)[:, None] * cum[:, -1:]  # < the row's total mass
            tokens = torch.searchsorted(cum, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
