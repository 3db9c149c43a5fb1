"""How token sequences are laid out in a batch, shared by the sampler and the learner so that their positions and
logprobs agree token for token: prompts left-padded (every completion starts at the same column), identical
prompts kept once (prefix sharing), and bf16 autocast on the model's device."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> input_ids (N, L), attention_mask (N, L), sequences aligned to the right edge."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def distinct_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """-> (each distinct prompt once, in first-seen order; the index into that list of every prompt). The grouping
    behind prefix sharing: the sampler prefills, and the learner runs, each distinct prompt once."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], rows


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on the model's device type (CPU or CUDA); weights stay fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
