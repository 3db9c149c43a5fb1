"""Teacher-forced forward passes over (prompt, completion) pairs in the engine's layout.

Prompts are left-padded and completions right-padded, so every completion starts at the same column and the
position ids match generation exactly: the learner's logprobs are comparable to the sampler's token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from posttrain.algos.logprobs import token_entropy, token_logprobs
from posttrain.rollout.hf import autocast, left_pad


@dataclass(frozen=True)
class PackedBatch:
    input_ids: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    position_ids: Tensor  # (B, P + T)
    targets: Tensor  # (B, T) completion tokens
    mask: Tensor  # (B, T) float, 1 on real completion tokens
    prompt_width: int  # P


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    p_ids, p_mask = left_pad(prompts, pad_id)
    width = max(1, max(len(c) for c in completions))
    c_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        if c:
            c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            c_mask[i, : len(c)] = 1
    ids = torch.cat([p_ids, c_ids], dim=1)
    attn = torch.cat([p_mask, c_mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(ids, attn, pos, c_ids, c_mask.float(), p_ids.shape[1])


def completion_logits(model: PreTrainedModel, batch: PackedBatch, *, bf16: bool = False) -> Tensor:
    """Logits predicting each completion token: (B, T, V)."""
    width = batch.targets.shape[1]
    dev = model.device
    with autocast(bf16, dev):
        out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                    position_ids=batch.position_ids.to(dev), logits_to_keep=width + 1)
    # logits_to_keep=T+1 returns the last T+1 positions; position P-1+t predicts completion token t.
    return out.logits[:, :width]


def completion_logprobs(model: PreTrainedModel, batch: PackedBatch, *, temperature: float = 1.0,
                        bf16: bool = False, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """-> logprobs (B, T) fp32 and optionally entropy (B, T); values at masked positions are meaningless."""
    logits = completion_logits(model, batch, bf16=bf16)
    lp = token_logprobs(logits, batch.targets.to(logits.device), temperature)
    ent = token_entropy(logits, temperature) if with_entropy else None
    return lp, ent


@torch.no_grad()
def logprobs_no_grad(model: PreTrainedModel, prompts, completions, pad_id: int, *, temperature: float = 1.0,
                     bf16: bool = False, micro_batch_size: int = 256) -> list[Tensor]:
    """Per-completion logprob vectors, computed in micro-batches without gradients (old/ref/teacher passes)."""
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for s in range(0, len(prompts), micro_batch_size):
            batch = pack(prompts[s: s + micro_batch_size], completions[s: s + micro_batch_size], pad_id)
            lp, _ = completion_logprobs(model, batch, temperature=temperature, bf16=bf16)
            for i, c in enumerate(completions[s: s + micro_batch_size]):
                out.append(lp[i, : len(c)].cpu())
    finally:
        model.train(was_training)
    return out
