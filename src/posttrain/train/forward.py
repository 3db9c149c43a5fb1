"""Teacher-forced forward passes over (prompt, completion) pairs in the engine's layout.

Prompts are left-padded and completions right-padded, so every completion starts at the same column and the
position ids match generation exactly: the learner's logprobs are comparable to the sampler's token for token.

Shared prefixes. An RL batch holds each prompt G times (one per sample of its group). `pack` keeps each distinct
prompt once, and `completion_outputs` runs the prompt forward once per distinct prompt, then the completions of all
its samples on top of that prompt's keys/values (the KV cache, gathered per row, with gradients flowing back
through it). The logits, the loss and the gradients are those of the plain pass over G full copies (up to float
summation order; tests/train/test_forward.py), at 1/G of the prompt tokens' work. The same trick the sampler uses
for generation (rollout/local.py), applied to the learner.

Large vocabularies. With a 150k vocabulary the (B, T, V) logits, not the model, fill the memory (B=256, T=512:
80 GB in fp32). Past CHUNKED_HEAD_MIN_VOCAB the logprobs come from the last hidden states through
algos/logprobs.py head_logprobs, a chunk of rows at a time, for the real completion tokens only; same values and
gradients (tests/train/test_forward.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from posttrain.algos.logprobs import head_logprobs, token_entropy, token_logprobs
from posttrain.models.layout import autocast, cache_kwargs, distinct_prompts, left_pad, output_cache
from posttrain.tracking.ledger import FlopModel
from posttrain.train.sharding import is_sharded

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class PackedBatch:
    prompt_ids: Tensor  # (U, P) the distinct prompts, left-padded
    prompt_mask: Tensor  # (U, P)
    prompt_rows: Tensor  # (B,) which of the U prompts each row continues
    targets: Tensor  # (B, T) completion tokens, right-padded
    mask: Tensor  # (B, T) float, 1 on real completion tokens
    prompt_pass: bool  # run the prompts in a forward pass of their own, the completions on their cache

    @property
    def shares_prefixes(self) -> bool:
        return self.prompt_ids.shape[0] < self.targets.shape[0]


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, *,
         share_prefixes: bool = True, prompt_pass: bool | None = None) -> PackedBatch:
    """Left-pad prompts and right-pad completions; with `share_prefixes`, identical prompts are kept once.
    `prompt_pass` (default: when some prompt is shared) runs the prompts in a pass of their own. A sharded learner
    sets it for every batch: each forward pass is a collective, so every rank must run as many passes."""
    if share_prefixes:
        distinct, rows = distinct_prompts(prompts)
    else:
        rows, distinct = list(range(len(prompts))), [list(p) for p in prompts]
    p_ids, p_mask = left_pad(distinct, pad_id)
    width = max(1, max(len(c) for c in completions))
    c_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        if c:
            c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            c_mask[i, : len(c)] = 1
    shared = p_ids.shape[0] < len(completions)
    return PackedBatch(p_ids, p_mask, torch.tensor(rows, dtype=torch.long), c_ids, c_mask.float(),
                       prompt_pass=shared if prompt_pass is None else prompt_pass)


def packed_flops(flops: FlopModel, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                 train: bool = False) -> float:
    """Model FLOPs of the pass `completion_outputs` runs over these rows (forward, or forward + backward with
    `train`): each distinct prompt once, its completions on top of it (tracking/ledger.py, *_shared_prefix)."""
    distinct, prompt_of = distinct_prompts(prompts)
    lengths: list[list[int]] = [[] for _ in distinct]
    for u, c in zip(prompt_of, completions):
        lengths[u].append(len(c))
    count = flops.train_shared_prefix if train else flops.forward_shared_prefix
    return sum(count(len(p), ts) for p, ts in zip(distinct, lengths))


CHUNKED_HEAD_MIN_VOCAB = 32_768  # from here on the (B, T, V) logits dominate the learner's memory


def chunked_head(model: PreTrainedModel) -> Tensor | None:
    """The LM head's weight when the logprobs can be taken from the last hidden states chunk by chunk
    (algos/logprobs.py head_logprobs): a large vocabulary and a plain bias-free linear head with nothing applied
    after it (no soft-capping or logit scale). None: use the model's own logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.out_features < CHUNKED_HEAD_MIN_VOCAB:
        return None
    if any(getattr(model.config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    if is_sharded(head.weight):  # train/sharding.py: only the model's own forward gathers a sharded head
        return None
    return head.weight


def completion_outputs(model: PreTrainedModel, batch: PackedBatch, *, bf16: bool = False,
                       hidden: bool = False) -> Tensor:
    """What predicts each completion token: the logits (B, T, V), or with `hidden` the decoder's last hidden
    states (B, T, H) that the LM head turns into them."""
    from transformers import (
        DynamicCache,  # lazy: importing transformers costs seconds, and config loading needs none
    )

    net = model.get_decoder() if hidden else model

    def run(**kwargs):
        if hidden:
            kwargs.pop("logits_to_keep", None)
            return net(**kwargs).last_hidden_state
        return net(**kwargs).logits

    dev = model.device
    rows = batch.prompt_rows.to(dev)
    p_ids, p_mask = batch.prompt_ids.to(dev), batch.prompt_mask.to(dev)
    c_ids, c_mask = batch.targets.to(dev), (batch.mask > 0).long().to(dev)
    width = c_ids.shape[1]
    with autocast(bf16, dev):
        if not batch.prompt_pass:
            ids = torch.cat([p_ids[rows], c_ids], dim=1)
            attn = torch.cat([p_mask[rows], c_mask], dim=1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            out = run(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=width + 1)
            # The last T+1 positions; position P-1+t predicts completion token t.
            return out[:, -(width + 1):-1]
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        prompt = net(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True,
                     **({} if hidden else {"logits_to_keep": 1}))
        prompt_last = (prompt.last_hidden_state if hidden else prompt.logits)[:, -1:]
        # Every row gets its prompt's keys/values (a gather: the backward sums the rows' gradients into them).
        cache = DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in output_cache(prompt).layers])
        attn = torch.cat([p_mask[rows], c_mask], dim=1)
        pos = p_mask.sum(-1)[rows, None] + torch.arange(width, device=dev)
        out = run(input_ids=c_ids, attention_mask=attn, position_ids=pos, **cache_kwargs(model, cache),
                  use_cache=True)
        # The prompt's last position predicts completion token 0; completion position t predicts token t + 1.
        return torch.cat([prompt_last[rows], out[:, : width - 1]], dim=1)


def completion_logprobs(model: PreTrainedModel, batch: PackedBatch, *, temperature: float = 1.0,
                        bf16: bool = False, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """-> logprobs (B, T) fp32 and optionally entropy (B, T); values at masked positions are meaningless (zero on
    the chunked-head path, which computes real tokens only)."""
    head = chunked_head(model)
    outputs = completion_outputs(model, batch, bf16=bf16, hidden=head is not None)
    return logprobs_from(outputs, head, batch.targets, batch.mask, temperature=temperature, with_entropy=with_entropy)


def logprobs_from(outputs: Tensor, head: Tensor | None, targets: Tensor, mask: Tensor, *, temperature: float,
                  with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """What predicts each completion token, (B, T, V) logits or with `head` (B, T, H) last hidden states ->
    logprobs (B, T) fp32 and optionally entropy; through the head only for the real tokens (mask > 0)."""
    targets = targets.to(outputs.device)
    if head is None:
        lp = token_logprobs(outputs, targets, temperature)
        return lp, token_entropy(outputs, temperature) if with_entropy else None
    real = mask.to(outputs.device) > 0
    lp_real, ent_real = head_logprobs(outputs[real], head, targets[real], temperature, with_entropy=with_entropy)
    lp = outputs.new_zeros(real.shape, dtype=torch.float32).masked_scatter(real, lp_real)
    ent = None if ent_real is None else outputs.new_zeros(real.shape, dtype=torch.float32).masked_scatter(real, ent_real)
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


@dataclass(frozen=True)
class ExamplePacks:
    """Examples laid end to end in rows of at most `row_tokens` tokens, padding-free (packed SFT).

    Each example's position ids restart at 0, which is how the model keeps attention inside an example:
    transformers reads a drop in the position ids as the start of a new sequence and makes the causal mask
    block-diagonal (masking_utils.find_packed_sequence_indices, with no attention mask and no cache). The targets
    and mask are those of `pack` (one row per example, right-padded), so a loss sees the same (B, T) layout."""

    ids: Tensor  # (R, L) the packed rows, right-padded
    positions: Tensor  # (R, L) position ids, restarting at 0 for each example (and for the padding)
    predicts: Tensor  # (B, T) flat index into (R, L) of the position whose output predicts each target (0: none)
    targets: Tensor  # (B, T) completion tokens, right-padded
    mask: Tensor  # (B, T) float, 1 on real completion tokens


def pack_examples(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                  row_tokens: int) -> ExamplePacks:
    """First fit, in the given order: each example goes into the first row with room for it; an example longer
    than row_tokens gets a row of its own. Every completion must have a prompt token before it (the position
    that predicts its first token)."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    if any(not p for p in prompts):
        raise ValueError("pack_examples: an example has an empty prompt (nothing predicts its first token)")
    rows: list[list[int]] = []  # example indices per row
    used: list[int] = []
    for i, n in enumerate(lengths):
        slot = next((r for r, u in enumerate(used) if u + n <= row_tokens), None)
        if slot is None:
            rows.append([i])
            used.append(n)
        else:
            rows[slot].append(i)
            used[slot] += n
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    t = max(1, max(len(c) for c in completions))
    predicts = torch.zeros((len(prompts), t), dtype=torch.long)
    targets = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t))
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            p, c = prompts[i], completions[i]
            ids[r, start: start + lengths[i]] = torch.tensor([*p, *c], dtype=torch.long)
            positions[r, start: start + lengths[i]] = torch.arange(lengths[i])
            if c:
                # position len(p) - 1 + j predicts completion token j
                predicts[i, : len(c)] = r * width + start + len(p) - 1 + torch.arange(len(c))
                targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
                mask[i, : len(c)] = 1
            start += lengths[i]
        positions[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return ExamplePacks(ids, positions, predicts, targets, mask)


def packed_completion_logprobs(model: PreTrainedModel, packs: ExamplePacks, *, temperature: float = 1.0,
                               bf16: bool = False, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """completion_logprobs over packed rows: -> logprobs (B, T) fp32 and optionally entropy, in the layout of the
    targets; equal to the unpacked pass's up to float summation order (tests/train/test_packing.py)."""
    dev = model.device
    head = chunked_head(model)
    net = model if head is None else model.get_decoder()
    with autocast(bf16, dev):
        out = net(input_ids=packs.ids.to(dev), position_ids=packs.positions.to(dev), use_cache=False)
    states = out.logits if head is None else out.last_hidden_state
    outputs = states.reshape(-1, states.shape[-1])[packs.predicts.to(dev)]  # (B, T, V or H), the targets' layout
    return logprobs_from(outputs, head, packs.targets, packs.mask, temperature=temperature, with_entropy=with_entropy)


def example_flops(flops: FlopModel, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> float:
    """Model FLOPs of training on each example whole (packed rows share nothing between examples)."""
    return sum(flops.train_shared_prefix(len(p), [len(c)]) for p, c in zip(prompts, completions, strict=True))
