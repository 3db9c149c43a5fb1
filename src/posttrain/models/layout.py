"""How token sequences are laid out in a batch, shared by the sampler and the learner so that their positions and
logprobs agree token for token: prompts left-padded (every completion starts at the same column), identical
prompts kept once (prefix sharing), and bf16 autocast on the model's device."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from typing import Any

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


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name warns, then goes away in
    # 5.40); older releases only know `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands a KV cache to this model's forward, whichever transformers is installed (a PEFT
    wrapper passes its keywords through to the model it wraps: that model's name counts)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_keyword(type(inner)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (`cache` in new transformers, `past_key_values` in old)."""
    return output["cache"] if "cache" in output else output["past_key_values"]
