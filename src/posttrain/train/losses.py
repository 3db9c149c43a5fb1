"""Losses and measurements over the Learner's forward output shared by several stages (SFT, pretraining, RLP),
and the padding of ragged per-token rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.train.learner import ForwardOut, Sequences


@dataclass(frozen=True)
class SFTLoss:
    """Summed negative log-likelihood of the completion tokens / the batch's completion tokens."""

    total_tokens: int

    def __call__(self, out: ForwardOut) -> tuple[Tensor, dict[str, float]]:
        nll = -torch.where(out.mask.bool(), out.logprobs, torch.zeros_like(out.logprobs)).sum()
        return nll / max(self.total_tokens, 1), {}


def held_out_nll(learner, held_out: Sequences) -> float:
    """Mean next-token NLL on held-out sequences: a measurement, not training compute (not in the ledger)."""
    lp, _ = learner.logprobs(held_out)
    return -float(sum(x.sum() for x in lp)) / sum(len(x) for x in lp)


def pad(rows: list[list[float]] | list[Tensor], width: int | None = None) -> Tensor:
    """Right-pad ragged rows with zeros into a (B, T) float tensor (T = the longest row, or `width`)."""
    width = width or max(1, max(len(r) for r in rows))
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        if len(r):
            out[i, : min(len(r), width)] = torch.as_tensor(r, dtype=torch.float)[:width]
    return out
