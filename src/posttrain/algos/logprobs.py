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


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] (and the entropy) for rows of hidden states, `chunk` rows at a time.

    Memory: the (rows, V) logits exist for one chunk at a time, forward and backward (the backward recomputes
    them), so a 150k vocabulary costs chunk x V floats instead of B x T x V. The gradients are exact:
        d logp / d z = onehot(target) - p,     d H / d z = -p (log p + H),     z = h W^T / T,
    and d/dh = (g_z / T) W, d/dW = (g_z / T)^T h, accumulated chunk by chunk in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int,
                with_entropy: bool):
        n = hidden.shape[0]
        lp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n, dtype=torch.float32)
        w = weight.float()
        for s in range(0, n, chunk):
            z = (hidden[s: s + chunk].float() @ w.t()) / temperature  # (c, V)
            logp = torch.log_softmax(z, dim=-1)
            lp[s: s + chunk] = logp.gather(-1, targets[s: s + chunk, None]).squeeze(-1)
            if with_entropy:
                ent[s: s + chunk] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        return lp, (ent if with_entropy else ent.zero_())

    @staticmethod
    def backward(ctx, g_lp: Tensor, g_ent: Tensor):
        hidden, weight, targets = ctx.saved_tensors
        w = weight.float()
        g_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        g_weight = torch.zeros_like(w)
        # In place where it matters: a chunk's (c, V) temporaries and the (V, H) weight gradient are the big
        # tensors; a fresh copy of the weight gradient per chunk cost more than the matmuls (measured).
        g_lp = g_lp.float() / ctx.temperature
        g_ent = g_ent.float() / ctx.temperature if ctx.with_entropy else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            h = hidden[rows].float()
            z = h @ w.t()
            if ctx.temperature != 1.0:
                z.div_(ctx.temperature)
            logp = torch.log_softmax(z, dim=-1)  # recomputed: (c, V)
            del z
            if g_ent is None:  # g_z = -g p, then + g at the target
                g_z = logp.exp_().mul_(-g_lp[rows, None])
            else:  # g_z = -p (g + g_H (log p + H)), then + g at the target
                p = logp.exp()
                ent = -(p * logp).sum(-1, keepdim=True)
                g_z = logp.add_(ent).mul_(g_ent[rows, None]).add_(g_lp[rows, None]).mul_(p).neg_()
            g_z.scatter_add_(-1, targets[rows, None], g_lp[rows, None])
            g_hidden[rows] = g_z @ w
            g_weight.addmm_(g_z.t(), h)
        return g_hidden.to(hidden.dtype), g_weight.to(weight.dtype), None, None, None, None


HEAD_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB fp32 per (rows, V) temporary (docs/performance.md)


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, *,
                  chunk: int | None = None, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Token logprobs (and entropy) straight from the last hidden states and the LM head's weight, without ever
    holding the full (N, V) logits: hidden (N, H), weight (V, H), targets (N,) -> (N,) fp32 each.

    Equal to token_logprobs / token_entropy of the logits h W^T (tests/algos/test_head_logprobs.py), values and
    gradients; what differs is memory, linear in `chunk` x V rather than in N x V. chunk: rows at a time
    (default: HEAD_CHUNK_ELEMENTS / V, so a chunk's logits stay the same size whatever the vocabulary)."""
    if chunk is None:
        chunk = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    lp, ent = _HeadLogprobs.apply(hidden, weight, targets, temperature, chunk, with_entropy)
    return lp, (ent if with_entropy else None)
