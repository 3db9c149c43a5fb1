"""Loss aggregation: per-token loss (B,T) -> scalar, ``fn(per_token, mask, *, norm, group_tokens)``.

Every normaliser is a GLOBAL count for the whole optimizer step (all micro-batches, all ranks), computed once
from the full batch by ``normalisers_for``. Each aggregate is then a plain sum of per-row terms divided by
constants, so summing it over any micro-batch split gives exactly the full-batch value (and gradient): the
gradient-accumulation loop needs no rescaling and cannot silently change the objective with the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from posttrain.registry import Registry


@dataclass(frozen=True)
class Normalisers:
    """Global counts for one optimizer step.

    total_tokens: valid (mask = 1) tokens; total_seqs: samples with at least one valid token;
    total_groups: prompts with at least one valid token; max_len: the generation cap (Dr. GRPO's constant).
    A zero count divides as 1: an all-masked step aggregates to 0 instead of NaN.
    """

    total_tokens: int
    total_seqs: int
    total_groups: int
    max_len: int

    def __post_init__(self) -> None:
        for name in ("total_tokens", "total_seqs", "total_groups", "max_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"Normalisers.{name} must be >= 0, got {getattr(self, name)}")


class AggregationFn(Protocol):
    def __call__(self, per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor: ...


AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


def normalisers_for(mask: Tensor, group_ids: Tensor, max_len: int) -> tuple[Normalisers, Tensor]:
    """Normalisers of a FULL batch, and group_tokens (B,): valid tokens of each sample's whole group.

    Samples (and groups) with no valid token are not counted: a recipe that zeroes the mask of filtered
    samples (DAPO dynamic sampling, ScaleRL zero-variance filtering) averages over the effective batch.
    """
    counts = mask.sum(-1)  # (B,) valid tokens per sample
    _, inv = torch.unique(group_ids, return_inverse=True)
    per_group = counts.new_zeros(int(inv.max()) + 1 if inv.numel() else 0).index_add_(0, inv, counts)
    norm = Normalisers(
        total_tokens=int(counts.sum().item()),
        total_seqs=int((counts > 0).sum().item()),
        total_groups=int((per_group > 0).sum().item()),
        max_len=max_len,
    )
    return norm, per_group[inv]


def _masked(per_token: Tensor, mask: Tensor) -> Tensor:
    # where(), not multiply: a NaN/inf in padding must not leak into the sum.
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token))


@AGGREGATIONS.register("token_mean")
def token_mean(per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor:
    """Σ l / total_tokens: DAPO's token-level loss (arXiv 2503.14476, §3.3); verl "token-mean"."""
    return _masked(per_token, mask).sum() / max(norm.total_tokens, 1)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor:
    """(1/N) Σ_i (1/|o_i|) Σ_t l: the original GRPO objective (arXiv 2402.03300, §4.1) and GSPO's."""
    lengths = mask.sum(-1).clamp(min=1)  # (B,) per-sample, so local counts are already exact
    return (_masked(per_token, mask).sum(-1) / lengths).sum() / max(norm.total_seqs, 1)


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor:
    """(1/N) Σ_i Σ_t l: verl "seq-mean-token-sum"."""
    return _masked(per_token, mask).sum() / max(norm.total_seqs, 1)


@AGGREGATIONS.register("prompt_mean")
def prompt_mean(per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor:
    """(1/P) Σ_prompts (1/Σ_g |o_g|) Σ_g Σ_t l: ScaleRL prompt-level averaging (arXiv 2510.13786, §4)."""
    row = _masked(per_token, mask).sum(-1) / group_tokens.to(per_token.dtype).clamp(min=1)  # (B,)
    return row.sum() / max(norm.total_groups, 1)


@AGGREGATIONS.register("constant")
def constant(per_token: Tensor, mask: Tensor, *, norm: Normalisers, group_tokens: Tensor) -> Tensor:
    """Σ l / (N * max_len): Dr. GRPO (arXiv 2503.20783); TRL ``dr_grpo``, verl "seq-mean-token-sum-norm".

    A constant normaliser removes GRPO's length bias: each token weighs the same whatever its sequence length.
    """
    return _masked(per_token, mask).sum() / max(norm.total_seqs * norm.max_len, 1)
