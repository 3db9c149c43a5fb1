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
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s: s + ctx.chunk].float()
            logp = torch.log_softmax((h @ w.t()) / ctx.temperature, dim=-1)  # recomputed: (c, V)
            p = logp.exp()
            g_z = -p * g_lp[s: s + ctx.chunk, None]
            g_z.scatter_add_(-1, targets[s: s + ctx.chunk, None], g_lp[s: s + ctx.chunk, None].float())
            if ctx.with_entropy:
                ent = -(p * logp).sum(-1, keepdim=True)
                g_z -= g_ent[s: s + ctx.chunk, None] * p * (logp + ent)
            g_z /= ctx.temperature
            g_hidden[s: s + ctx.chunk] = g_z @ w
            g_weight += g_z.t() @ h
        return g_hidden.to(hidden.dtype), g_weight.to(weight.dtype), None, None, None, None


HEAD_CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in fp32 for each of the few (rows, V) temporaries


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
